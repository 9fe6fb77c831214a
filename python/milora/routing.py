"""Routing as explicit, scoped, per-request state.

Three lifetimes, three named types (see docs/module_layer.md for the picture):

  * `Request`: what one `MiLoRAModel.forward` / `generate` call asked for: each row's adapter
    slot, the prompt mask the routers pool over, whether load-balancing losses are collected.
    Built once per call by the model.
  * `BatchPlan`: one forward of the decoder stack (a prefill, a decode step, a training
    forward): `seq_offsets`, `adapter_ids` and, per (layer, module), the gates the op reads.
    Built by the model at the start of each forward; read-only to `MiLoRALinear`.
  * `PromptGates`: the gates of one prompt (per row, per (layer, module), [B, E] float32, LoRA
    scaling included). Computed by the model's routers while the prompt runs, then stored WITH
    the KV cache that prompt filled (`attach_gates` / `gates_of`). A forward that continues a
    cache reads that cache's gates: never the gates of another request.

`CallContext` ties them together for one call. `MiLoRAModel.routing(request)` enters it in a
`contextvars.ContextVar`, so every thread (and every asyncio task) has its own; nothing of it
survives the call except what the cache holds. `MiLoRALinear.forward` reads
`current_call()` -> `.plan` -> `for_linear(layer, module)` and writes nothing back.

The one thing written during a forward besides the gates is `CallContext.aux`: the
load-balancing losses that routers return. Layer routers return theirs to the model's routing
step; the per-token routers of token-routed ("MOELoRA") linears hand theirs to
`CallContext.add_aux`. The model sums them after the call. When several adapters are trained
at once, routers hand one loss per trained adapter, each over its own rows or tokens
(`CallContext.add_adapter_aux`), so that each adapter's loss is the one it would have alone.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

GATES_ATTR = "_milora_gates"

_CALL: contextvars.ContextVar = contextvars.ContextVar("milora_call", default=None)


def current_call() -> Optional["CallContext"]:
    """The CallContext of the MiLoRA call running in this thread / task, or None."""
    return _CALL.get()


# ---- per-slot tables (one adapter set) ---------------------------------------------------


@dataclass(frozen=True)
class SlotTables:
    """What routing needs to know about the loaded adapters (rebuilt by the model after every
    adapter change; `version` names the adapter set it describes)."""

    version: int
    scale: Tensor                 # [L, P, 7] float32 LoRA scaling of slot p at (layer, module); 0 = not adapted
    static_weights: Tensor        # [P, E] float32: a static adapter's expert weights (1/E on its experts)
    is_prompt: Tensor             # [P] bool: slot is prompt-routed
    is_token: Tensor              # [P] bool: slot is token-routed
    kinds: Tuple[str, ...]        # [P] adapter kind of each slot
    experts: Tuple[Tuple[Optional[int], ...], ...]  # [L][7] E of the linear at (layer, module); None = not wrapped


@dataclass(frozen=True)
class TokenSettings:
    """Per-token routing settings shared by all token-routed rows of a request (None: per row)."""

    top_k: Optional[int]
    hard: Optional[bool]
    k_max: int
    single_slot: Optional[int]    # the only token-routed slot present, if there is one


# ---- Request: one call ---------------------------------------------------------------------


class Rows:
    """A request's rows expanded to a batch of B rows (HF repeats rows for beams and
    num_return_sequences): index tensors built once per (request, B)."""

    __slots__ = ("slots", "slots_clamped", "valid", "is_prompt", "is_token", "mask", "key")

    def __init__(self, slots: Tensor, key: Tuple[int, ...], tables: SlotTables, mask: Optional[Tensor]):
        self.slots = slots                                   # [B] long, -1 = base
        self.key = key                                       # the same as a tuple of ints
        self.slots_clamped = slots.clamp_min(0)              # [B] long, a valid gather index
        self.valid = slots >= 0                              # [B] bool
        if tables.is_prompt.numel():
            self.is_prompt = tables.is_prompt.index_select(0, self.slots_clamped) & self.valid
            self.is_token = tables.is_token.index_select(0, self.slots_clamped) & self.valid
        else:
            self.is_prompt = torch.zeros_like(self.valid)
            self.is_token = torch.zeros_like(self.valid)
        self.mask = mask                                     # [B, L0] bool pool mask or None


class Request:
    """What one forward()/generate() call asked for. Immutable after construction (its row
    tensors are derived lazily, once per batch size)."""

    def __init__(self, slots: Sequence[int], device: torch.device, tables: SlotTables,
                 prompt_mask: Optional[Tensor] = None, collect_aux: bool = False,
                 token: Optional[TokenSettings] = None, route_once: bool = False) -> None:
        self.slots: Tuple[int, ...] = tuple(int(s) for s in slots)
        self.device = device
        self.tables = tables
        self.version = tables.version
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(device=device, dtype=torch.bool)
        self.collect_aux = bool(collect_aux)
        self.token = token
        # generate(use_cache=False) re-runs the whole sequence every step: route the first
        # forward (the prompt) only and keep its gates for the call
        self.route_once = bool(route_once)
        present = sorted({s for s in self.slots if s >= 0})
        self.kinds: FrozenSet[str] = frozenset(tables.kinds[s] for s in present)
        self.prompt_slots: List[int] = [s for s in present if tables.kinds[s] == "prompt"]
        self.all_base = not present
        self._slot_tensor = torch.tensor(self.slots, dtype=torch.long, device=device)
        # several adapters trained at once (set by the model): the trained slots among the rows,
        # and per adapter kind ("prompt" / "token") those of that kind with their [G] tensor;
        # routers then hand CallContext one Switch loss per trained adapter of their kind
        self.train_slots: Tuple[int, ...] = ()
        self.train_by_kind: Dict[str, Tuple[Tuple[int, ...], Tensor]] = {}
        self._rows: Dict[int, Rows] = {}
        self._offsets: Dict[Tuple[int, int], Tensor] = {}
        self._token_plans: Dict[Tuple[int, int], "TokenPlan"] = {}

    def set_train_slots(self, slots: Sequence[int]) -> None:
        """Several adapters trained at once: the trained slots present among the rows (each
        adapter's load-balancing loss is then computed over its own rows / tokens only)."""
        self.train_slots = tuple(int(s) for s in slots)
        self.train_by_kind = {}
        for kind in ("prompt", "token"):
            own = tuple(s for s in self.train_slots if self.tables.kinds[s] == kind)
            if own:
                self.train_by_kind[kind] = (own, torch.tensor(own, dtype=torch.long, device=self.device))

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def rows(self, B: int) -> Rows:
        """The request's rows for a batch of B rows: as given, or each repeated B / B0 times."""
        rt = self._rows.get(B)
        if rt is None:
            B0 = self.batch_size
            if B == B0:
                slots, mask, key = self._slot_tensor, self.prompt_mask, self.slots
            elif B0 > 0 and B % B0 == 0:
                k = B // B0
                slots = self._slot_tensor.repeat_interleave(k)
                mask = None if self.prompt_mask is None else self.prompt_mask.repeat_interleave(k, 0)
                key = tuple(s for s in self.slots for _ in range(k))
            else:
                raise ValueError(f"MiLoRA: adapter_names / prompt_mask describe {B0} rows but the model got a batch "
                                 f"of {B} rows")
            rt = Rows(slots, key, self.tables, mask)
            self._rows[B] = rt
        return rt

    def offsets(self, num_seqs: int, seq_len: int) -> Tensor:
        """arange(num_seqs + 1) * seq_len as int64 (built once per shape and call: decode steps
        reuse one tensor)."""
        t = self._offsets.get((num_seqs, seq_len))
        if t is None:
            t = torch.arange(num_seqs + 1, dtype=torch.long, device=self.device) * seq_len
            self._offsets[(num_seqs, seq_len)] = t
        return t

    def token_plan(self, B: int, L: int) -> Optional["TokenPlan"]:
        """The per-token routing plan of a [B, L] forward, or None when no row is token-routed."""
        if "token" not in self.kinds:
            return None
        tp = self._token_plans.get((B, L))
        if tp is None:
            rows = self.rows(B)
            tp = TokenPlan(L, self.offsets(B * L, 1), rows.slots.repeat_interleave(L),
                           rows.is_token.repeat_interleave(L), len(self.kinds) > 1, self.token)
            self._token_plans[(B, L)] = tp
        return tp


# ---- PromptGates: one prompt, stored with its KV cache --------------------------------------


class PromptGates:
    """Gates of one prompt batch: `per_layer[layer][module]` is [B, E] float32 (LoRA scaling
    included) or None (module not adapted). Filled by the model while the prompt's forward runs
    (one layer at a time), then only read."""

    __slots__ = ("owner", "version", "slots", "per_layer", "prompt_len", "unused", "_step_indices")

    def __init__(self, owner: object, version: int, slots: Tuple[int, ...], num_layers: int, num_modules: int,
                 prompt_len: int) -> None:
        self.owner = owner              # the model's routing key: gates of another model are refused
        self.version = version          # the adapter set the slots refer to
        self.slots = slots              # each row's slot (-1 = base)
        self.per_layer: List[List[Optional[Tensor]]] = [[None] * num_modules for _ in range(num_layers)]
        self.prompt_len = prompt_len    # tokens the routers pooled over (incl. padding)
        # unused[layer][module]: True when no row has a non-zero gate there (set once per prompt by
        # an inference forward; None = not known). Such a linear is the base layer alone on every
        # later step, so it skips the op (with top-3 of 7 and few adapters, most of them do).
        self.unused: List[Optional[List[bool]]] = [None] * num_layers
        self._step_indices: Dict[Tuple[int, torch.device], Tuple[Tensor, Tensor]] = {}

    def step_indices(self, seq_offsets: Tensor, adapter_ids: Tensor, seq_len: int) -> Tuple[Tensor, Tensor]:
        """The index tensors of a continuation of this prompt with seq_len tokens per row: the
        first ones given are kept and returned for every later continuation (their values depend
        only on the rows, which a continuation must keep, and on seq_len), so every decode step
        of this prompt hands the linears the same objects, also across calls (manual decoding,
        one request per step), and a linear can keep what it derived from them."""
        key = (seq_len, seq_offsets.device)
        kept = self._step_indices.get(key)
        if kept is None:
            kept = self._step_indices[key] = (seq_offsets, adapter_ids)
        return kept
    def skips(self, layer: int, module: int) -> bool:
        """Whether linear (layer, module) has no active expert in any row (known, not guessed)."""
        flags = self.unused[layer]
        return flags is not None and flags[module]

    @property
    def batch_size(self) -> int:
        return len(self.slots)


def gates_of(cache) -> Optional[PromptGates]:
    """The PromptGates stored with a KV cache, or None."""
    return None if cache is None else getattr(cache, GATES_ATTR, None)


def attach_gates(cache, gates: PromptGates) -> None:
    """Store a prompt's gates with the KV cache its forward filled."""
    try:
        setattr(cache, GATES_ATTR, gates)
    except AttributeError as e:
        raise TypeError(f"MiLoRA: cannot store routing gates on a KV cache of type {type(cache).__name__}; "
                        "use a transformers Cache object (DynamicCache, StaticCache, ...)") from e


# ---- BatchPlan: one forward --------------------------------------------------------------


class TokenPlan:
    """Per-token routing (MOELoRA rows) of one forward: the op runs with one sequence per token."""

    __slots__ = ("seq_len", "offsets", "adapter_ids", "slots_clamped", "is_routed", "rows_mixed", "settings")

    def __init__(self, seq_len: int, offsets: Tensor, adapter_ids: Tensor, is_routed: Tensor, rows_mixed: bool,
                 settings: TokenSettings) -> None:
        self.seq_len = seq_len                    # L: tokens per row in this forward
        self.offsets = offsets                    # [B*L + 1] long = arange
        self.adapter_ids = adapter_ids            # [B*L] long, -1 = base
        self.slots_clamped = adapter_ids.clamp_min(0)
        self.is_routed = is_routed                # [B*L] bool: the token's row is token-routed
        self.rows_mixed = rows_mixed              # other kinds share the batch
        self.settings = settings


class BatchPlan:
    """Everything the adapted linears read during one forward of the decoder stack.

    Built by the model at the start of the forward. `routes` is True for a forward that runs
    the routers (a prompt): the model fills `gates` layer by layer before that layer's linears
    run. Linears call `for_linear(layer, module)` and never write to the plan."""

    __slots__ = ("seq_offsets", "adapter_ids", "all_base", "gates", "routes", "rows", "pool_mask", "token")

    def __init__(self, seq_offsets: Tensor, adapter_ids: Tensor, all_base: bool, gates: Optional[PromptGates],
                 routes: bool, rows: Rows, pool_mask: Optional[Tensor], token: Optional[TokenPlan]) -> None:
        self.seq_offsets = seq_offsets    # [B + 1] long
        self.adapter_ids = adapter_ids    # [B] long, -1 = base
        self.all_base = all_base          # no row uses an adapter: every linear is its base linear
        self.gates = gates                # PromptGates of this batch's prompt (None when all_base)
        self.routes = routes              # this forward computes the gates (prompt / training forward)
        self.rows = rows                  # the request's rows at this batch size (model-side)
        self.pool_mask = pool_mask        # [B, L] bool prompt mask of a routing forward (model-side)
        self.token = token                # TokenPlan when token-routed rows are present

    def for_linear(self, layer: int, module: int) -> Tensor:
        """[B, E] gates of the linear at (layer, module index)."""
        g = self.gates.per_layer[layer][module]
        if g is None:
            raise RuntimeError(
                f"MiLoRA: no gates for the linear at layer {layer}, module {module} in this forward; a MiLoRA "
                "linear must run inside its own decoder layer during a MiLoRAModel call")
        return g

    def with_layer_gates(self, layer: int, gates: Sequence[Optional[Tensor]]) -> "BatchPlan":
        """A copy of this plan whose layer `layer` reads `gates` (gradient checkpointing hands the
        recomputed layer the gates it saved as inputs)."""
        pg = PromptGates(self.gates.owner, self.gates.version, self.gates.slots, 0, 0, self.gates.prompt_len)
        pg.per_layer = list(self.gates.per_layer)
        pg.per_layer[layer] = list(gates)
        pg.unused = list(self.gates.unused)
        return BatchPlan(self.seq_offsets, self.adapter_ids, self.all_base, pg, False, self.rows, self.pool_mask,
                         self.token)


# ---- CallContext: one call -----------------------------------------------------------------


class CallContext:
    """One MiLoRAModel call (forward or generate) in one thread: its request, the plan of the
    forward running now, the gates kept for the call when there is no cache, and the aux losses."""

    __slots__ = ("owner", "request", "plan", "pinned", "call_gates", "aux", "adapter_aux", "scope", "synced")

    def __init__(self, owner: object, request: Request, plan: Optional[BatchPlan] = None) -> None:
        self.owner = owner
        self.request = request
        # plan given here: the caller (e.g. a continuous-batching engine with a packed ragged
        # batch) built it; the model uses it for every forward of the call instead of building one
        self.plan: Optional[BatchPlan] = plan
        self.pinned = plan is not None
        self.call_gates: Optional[PromptGates] = None
        self.aux: List[Tensor] = []
        # several adapters trained at once: kind -> one [G] tensor per router, the Switch losses
        # of the G trained adapters of that kind (request.train_by_kind), each over its own rows
        self.adapter_aux: Dict[str, List[Tensor]] = {}
        self.scope: Optional["_Entered"] = None  # set when the model opened this call for one forward
        # True when the model brought every trainable slot up to date at the start of this call
        # (forward / generate do): its layers then skip the per-forward sync
        self.synced = False

    def add_aux(self, loss: Tensor) -> None:
        """A router's load-balancing loss (collected only when the request asks for it)."""
        if self.request.collect_aux:
            self.aux.append(loss)

    def add_adapter_aux(self, kind: str, losses: Tensor) -> None:
        """A router's load-balancing losses, one per trained adapter of `kind` (several adapters
        trained at once), in the order of request.train_by_kind[kind]."""
        if self.request.collect_aux:
            self.adapter_aux.setdefault(kind, []).append(losses)


class _Entered:
    """Context manager entering a CallContext in this thread / task."""

    __slots__ = ("ctx", "_token")

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self._token = None

    def __enter__(self) -> CallContext:
        self._token = _CALL.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc) -> None:
        _CALL.reset(self._token)


def enter(ctx: CallContext) -> _Entered:
    """`with enter(ctx):` makes ctx the current call of this thread / task for the block."""
    return _Entered(ctx)


# ---- gradient checkpointing ------------------------------------------------------------


class RoutedCheckpoint:
    """A decoder layer's gradient-checkpoint function that keeps routing outside the checkpoint.

    HF checkpoints a layer's `forward` (its pre-hooks, where the router runs, stay outside).
    This wrapper hands the layer's gates to the checkpoint as explicit tensor inputs and runs
    the layer (first pass and recomputation) in a call context whose plan reads exactly those
    inputs: recomputation, which happens in backward after the call has ended, sees the same
    plan, and with use_reentrant=True the gradient reaches the routers through the inputs.
    Per-token routers (token-routed linears) run inside the checkpoint; their aux losses are
    kept from the first pass only."""

    def __init__(self, owner: RoutingKey, layer_idx: int, inner) -> None:
        self.owner = owner
        self.layer_idx = layer_idx
        self.inner = inner

    def __call__(self, fn, *args, **kwargs):
        ctx = current_call()
        if ctx is None or ctx.owner is not self.owner or ctx.plan is None or ctx.plan.all_base:
            return self.inner(fn, *args, **kwargs)
        i, n, plan = self.layer_idx, len(args), ctx.plan
        layer_gates = list(plan.gates.per_layer[i])
        present = [m for m, g in enumerate(layer_gates) if g is not None]
        passes = []
        grad_outside = torch.is_grad_enabled()

        def run(*inputs):
            if not passes and grad_outside and not torch.is_grad_enabled() and plan.token is not None \
                    and ctx.request.collect_aux:
                raise NotImplementedError(
                    "MiLoRA: reentrant gradient checkpointing cannot train per-token routers (routing='token'): their "
                    "load-balancing loss is computed inside the checkpoint without gradient. Use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}")
            gates = list(layer_gates)
            for m, t in zip(present, inputs[n:]):
                gates[m] = t
            inner_ctx = CallContext(ctx.owner, ctx.request, plan.with_layer_gates(i, gates))
            if not passes:  # first pass: its aux losses count; a recomputation's are dropped
                inner_ctx.aux = ctx.aux
                inner_ctx.adapter_aux = ctx.adapter_aux
            passes.append(None)
            with enter(inner_ctx):
                return fn(*inputs[:n])

        return self.inner(run, *args, *[layer_gates[m] for m in present], **kwargs)


class RoutingKey:
    """Identity of one MiLoRAModel's routing: its layers and its stored gates carry it, so a call
    context or a cache of another model is never read."""

    __slots__ = ()
