"""The per-forward routing context shared by a MiLoRAModel and all its MiLoRALinear layers.

Lifetimes:
  * a *request* (`RoutingRequest`) is what one `MiLoRAModel.forward` / `generate` call asked for:
    each row's adapter slot (from adapter_names), the prompt mask, whether to collect the
    load-balancing loss. It is built once per call, before the HF model runs.
  * per *forward* (one prefill or one decode step), the model's pre-hook on its inner decoder
    stack fills the row tensors for the batch it sees (expanding rows for beams /
    num_return_sequences), `seq_offsets` (cached per (B, L)) and decides whether this forward
    routes (`route_now`: the cache is empty, or no gates exist for this batch).
  * per *prompt*, the decoder-layer pre-hooks of a routing forward store each adapted linear's
    gates in `gates[layer][module]` ([B, E] float32, LoRA scaling included); decode steps reuse
    them untouched. `MiLoRAModel.generate` clears them at the start of every call.

Nothing here runs per linear on a decode step except reading `gates[layer][module]`,
`seq_offsets` and `adapter_ids`.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class RowTensors:
    """Index tensors of a request expanded to a batch of B rows (built once per (request, B))."""

    __slots__ = ("slots", "slots_clamped", "valid", "is_prompt", "is_token", "mask")

    def __init__(self, slots: Tensor, slot_is_prompt: Tensor, slot_is_token: Tensor, mask: Optional[Tensor]):
        self.slots = slots                                   # [B] long, -1 = base
        self.slots_clamped = slots.clamp_min(0)              # [B] long, valid gather index
        self.valid = (slots >= 0)                            # [B] bool
        if slot_is_prompt.numel():
            self.is_prompt = slot_is_prompt.index_select(0, self.slots_clamped) & self.valid
            self.is_token = slot_is_token.index_select(0, self.slots_clamped) & self.valid
        else:
            self.is_prompt = torch.zeros_like(self.valid)
            self.is_token = torch.zeros_like(self.valid)
        self.mask = mask                                     # [B, L0] bool pool mask or None


class RoutingRequest:
    """What one forward()/generate() call asked for (see the module docstring)."""

    def __init__(
        self,
        slot_list: Sequence[int],
        device: torch.device,
        kinds: FrozenSet[str],
        prompt_slots: Sequence[int],
        token_settings: Tuple,
        mask: Optional[Tensor],
        collect_aux: bool,
        version: int,
        sticky: bool = False,
    ) -> None:
        self.slot_list = tuple(int(s) for s in slot_list)
        self.slots = torch.tensor(self.slot_list, dtype=torch.long, device=device)
        self.kinds = kinds                     # adapter kinds present among the rows (no "base")
        self.prompt_slots = list(prompt_slots)  # slots of prompt-routed adapters present
        self.token_top_k, self.token_hard, self.token_k_max, self.token_single_slot = token_settings
        self.mask = None if mask is None else mask.to(device=device, dtype=torch.bool)
        self.collect_aux = collect_aux
        self.all_base = all(s < 0 for s in self.slot_list)
        self.version = version                 # MiLoRAModel adapter version it was built for
        self.sticky = sticky                   # generate(): route once per call, whatever the cache
        self._rows: Dict[int, RowTensors] = {}
        self._token: Dict[Tuple[int, int], Tuple] = {}

    @property
    def batch_size(self) -> int:
        return len(self.slot_list)

    def rows(self, B: int, slot_is_prompt: Tensor, slot_is_token: Tensor) -> RowTensors:
        """Row tensors for a batch of B rows: the request's rows, or each repeated B / B0 times
        (HF expands prompts with repeat_interleave for beams and num_return_sequences)."""
        rt = self._rows.get(B)
        if rt is None:
            B0 = self.batch_size
            if B == B0:
                slots, mask = self.slots, self.mask
            elif B0 > 0 and B % B0 == 0:
                k = B // B0
                slots = self.slots.repeat_interleave(k)
                mask = None if self.mask is None else self.mask.repeat_interleave(k, 0)
            else:
                raise ValueError(
                    f"MiLoRA: adapter_names / prompt_mask describe {B0} rows but the model got a batch of {B} rows")
            rt = RowTensors(slots, slot_is_prompt, slot_is_token, mask)
            self._rows[B] = rt
        return rt


class RoutingState:
    """Mutable routing context; one per MiLoRAModel, referenced by each of its MiLoRALinear."""

    def __init__(self) -> None:
        self.active = False           # True only while the model's decoder stack runs
        self.request: Optional[RoutingRequest] = None   # set by forward()/generate()
        self.current: Optional[RoutingRequest] = None   # the request of the running forward
        # per forward
        self.all_base = False
        self.route_now = False
        self.batch_size = 0
        self.seq_len = 0
        self.rows: Optional[RowTensors] = None
        self.adapter_ids: Optional[Tensor] = None
        self.seq_offsets: Optional[Tensor] = None
        self.pool_mask: Optional[Tensor] = None
        self.collect_aux = False
        self.aux_losses: List[Tensor] = []
        # per-token routing (MOELoRA), per forward
        self.token_routing = False
        self.token_offsets: Optional[Tensor] = None
        self.token_adapter_ids: Optional[Tensor] = None
        self.token_slots_clamped: Optional[Tensor] = None
        self.token_is_routed: Optional[Tensor] = None
        self.token_is_routed_aux: Optional[Tensor] = None
        self.token_rows_mixed = False
        self.token_top_k = None
        self.token_hard = None
        self.token_k_max = None
        self.token_single_slot = None
        # per prompt
        self.gates: List[List[Optional[Tensor]]] = []
        self.gates_key = None
        self._offsets: Dict[Tuple, Tensor] = {}

    def clear_gates(self) -> None:
        """Forget the stored gates: the next forward routes again."""
        self.gates = []
        self.gates_key = None

    def offsets(self, num_seqs: int, seq_len: int, device: torch.device) -> Tensor:
        """arange(num_seqs + 1) * seq_len as int64, cached."""
        key = (num_seqs, seq_len, device)
        t = self._offsets.get(key)
        if t is None:
            if len(self._offsets) > 64:
                self._offsets.clear()
            t = torch.arange(num_seqs + 1, dtype=torch.long, device=device) * seq_len
            self._offsets[key] = t
        return t
