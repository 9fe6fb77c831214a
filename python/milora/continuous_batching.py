"""Continuous batching with one adapter per request (transformers 5.x `ContinuousBatchingManager`).

    outs = model.generate_batch(prompts, generation_config, adapter_names=["a", "base", "b"])
    manager = model.init_continuous_batching(generation_config)
    manager.start()
    rid = manager.add_request(prompt_ids, max_new_tokens=32, adapter_name="a")   # any time, also mid-decode
    out = next(manager.request_id_iter(rid))  # its GenerationOutput, like transformers

How transformers drives the model: a background thread schedules the live requests into one packed
row per engine step (input_ids [1, T], cu_seq_lens_q [S + 1]; prompts of new requests and one token of
every decoding request side by side) and calls the model's forward with a paged KV cache. The forward's
kwargs carry no request ids; the engine's `requests_in_batch` does, and this module reads it around
every step (`MiLoRAContinuousBatchingManager._generation_step`).

Per engine step, with milora.routing's types:
    PackedStep (this module): request ids, adapters, query lengths, each request's stored gates
      -> Request (model._make_request: one row per packed sequence)
      -> BatchPlan: seq_offsets = cu_seq_lens_q, adapter_ids per sequence, PromptGates with one
         gate row per sequence per (layer, module) (per token, TokenPlan, when MOELoRA rows are in)
    with model.routing(request, plan=plan):   # the model uses this plan instead of a [B, L] one
        engine forward; layer pre-hooks (acting only in this step's call) route the step's new prompts,
        each pooled over its own segment of the packed row, and write their gates into the plan
        before the layer's linears read it
    the new prompts' gates ([layers, 7, E], LoRA scaling included) go to the GateStore, keyed by
    request id: every later step of that request reuses them; they are dropped when it is gone.
Each adapted linear makes ONE op call per step for the whole packed ragged batch.

Choices where transformers leaves room:
  * prompts are never chunked: MiLoRA's router of layer i pools over the hidden states of the whole
    prompt entering layer i, which do not exist for the first chunk while the later ones are
    unprocessed, so exact pooling across chunks is impossible. The scheduler is wrapped
    (`_whole_prompt_candidates`) so a prompt is scheduled whole or waits; a prompt longer than the engine's
    `max_batch_tokens` fails with a clear error instead of waiting forever.
  * prefix sharing (`allow_block_sharing`) is turned off: a shared KV prefix was computed with
    another request's adapter, and a request that skips its prefix cannot be routed from it.
  * CUDA graphs, torch.compile of the engine step and async double buffering are refused: a replayed
    graph would skip the per-step routing, async batching prepares the next batch during the step.
  * num_return_sequences > 1 is refused (the engine forks a request after prefilling all but the
    last prompt token, i.e. a chunked prompt).
  * a request re-prefilled after its cache was evicted (engine soft reset) reuses its stored gates.
  * other calls of the same model (generate, forward) while the engine serves: do them inside
    `manager.pause()`. transformers' engine is not safe against a forward of its model running in
    another thread at the same time (measured with transformers 5.24 on a plain model, no MiLoRA:
    most such generate calls return wrong tokens); MiLoRA's routing itself is per call.
"""
from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import MODULE_NAMES

BASE_NAMES = (None, "base", "__base__")

# transformers' continuous-batching attributes that MiLoRAModel must never take from its base model:
# the base model's engine would serve every request without adapters
NOT_FROM_BASE_MODEL = frozenset({"generate_batch", "init_continuous_batching", "continuous_batching_context_manager",
                                 "destroy_cached_continuous_batching_manager", "_cached_continuous_batching_manager"})


class _ActiveAdapter:
    """Default of `adapter_name` / `adapter_names`: the model's active adapter (like generate)."""

    def __repr__(self) -> str:
        return "ACTIVE_ADAPTER"


ACTIVE_ADAPTER = _ActiveAdapter()


def _cb_modules():
    """transformers' continuous-batching classes, or an ImportError naming what is missing."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching import continuous_api
        from transformers.generation.continuous_batching.requests import RequestStatus
    except ImportError as e:  # pragma: no cover - transformers < 5 has no continuous batching
        raise ImportError(f"MiLoRA continuous batching needs transformers >= 5 (ContinuousBatchingManager): {e}") from e
    return continuous_api, ContinuousBatchingConfig, GenerationConfig, RequestStatus


# ---- the scheduler: whole prompts only ---------------------------------------------------


def _whole_prompt_candidates(scheduler, candidates, token_budget, cache_budget, request_ids_to_remove_from_waiting):
    """`_process_candidates` of a scheduler that never splits a prompt into chunks.

    transformers' schedulers give a prompt whatever is left of the step's token budget and keep the
    rest for later steps. Here candidates are filtered first: decoding requests pass; a prompt passes
    only if it fits in the budget left after the candidates kept before it; once a prompt has to
    wait, later prompts wait too (first come, first served). A prompt longer than the whole budget
    can never run: it is taken off the queue and put in `scheduler.unschedulable` for the manager
    to fail."""
    _, _, _, RequestStatus = _cb_modules()
    kept, left, blocked = [], token_budget, False
    for state in candidates:
        if state.status == RequestStatus.DECODING:
            need = max(len(state.tokens_to_process), 1)
        else:
            need = len(state.remaining_prefill_tokens)
            if need > token_budget:
                scheduler.waiting_requests.pop(state.request_id, None)
                scheduler.active_requests.pop(state.request_id, None)
                request_ids_to_remove_from_waiting.add(state.request_id)
                scheduler.unschedulable.append((state, token_budget))
                continue
            if blocked or need > left:
                blocked = True
                continue
        kept.append(state)
        left -= need
    return type(scheduler)._process_candidates(scheduler, kept, token_budget, cache_budget,
                                               request_ids_to_remove_from_waiting)


def _schedule_whole_prompts(scheduler) -> None:
    """Make `scheduler` (an instance of any transformers scheduler) schedule prompts whole."""
    if getattr(scheduler, "unschedulable", None) is None:
        scheduler.unschedulable = []
        scheduler._process_candidates = types.MethodType(_whole_prompt_candidates, scheduler)


# ---- per-request state: adapters and gates ------------------------------------------------


class GateStore:
    """What the engine's requests carry for MiLoRA: each request's adapter name (set when it is
    added) and its prompt gates (set when its prompt is prefilled). Keyed by request id; thread
    safe (requests are added from user threads, read by the engine thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adapter: Dict[str, Optional[str]] = {}
        self._gates: Dict[str, Tensor] = {}
        self._seen = set()  # requests the engine has scheduled at least once

    def add(self, request_id: str, adapter_name: Optional[str]) -> None:
        with self._lock:
            self._adapter[request_id] = adapter_name
            self._gates.pop(request_id, None)
            self._seen.discard(request_id)

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._adapter.pop(request_id, None)
            self._gates.pop(request_id, None)
            self._seen.discard(request_id)

    def adapter(self, request_id: str) -> Optional[str]:
        """The adapter of a request the engine scheduled (marks it as seen by the engine)."""
        try:
            name = self._adapter[request_id]
            self._seen.add(request_id)
            return name
        except KeyError:
            if request_id.startswith("__warmup_"):
                return None  # the engine's warm-up requests run the base model
            raise RuntimeError(f"MiLoRA continuous batching: request {request_id!r} was not added through the MiLoRA "
                               "manager (add_request / add_requests), so its adapter is unknown") from None

    def gates(self, request_id: str) -> Optional[Tensor]:
        return self._gates.get(request_id)

    def set_gates(self, request_id: str, gates: Tensor) -> None:
        with self._lock:
            if request_id in self._adapter:
                self._gates[request_id] = gates

    def prune(self, live) -> None:
        """Forget the requests the engine has scheduled that are no longer live (finished, failed or
        cancelled). Requests added but not scheduled yet are kept, wherever they are on their way."""
        with self._lock:
            for rid in [r for r in self._seen if r not in live]:
                self._adapter.pop(rid, None)
                self._gates.pop(rid, None)
                self._seen.discard(rid)

    def __len__(self) -> int:
        return len(self._adapter)


class PackedStep:
    """One engine step as MiLoRA sees it: S packed sequences of the one-row batch.

    request_ids, adapter_names: per sequence; lengths: query tokens per sequence (a whole prompt or
    one decode token); seq_offsets [S + 1] int64 (= the engine's cu_seq_lens_q); gates: per sequence
    the stored prompt gates [layers, 7, E] or None for a prompt routed in this step."""

    __slots__ = ("request_ids", "adapter_names", "lengths", "seq_offsets", "gates", "key")

    def __init__(self, request_ids, adapter_names, lengths, gates, device) -> None:
        self.request_ids: Tuple[str, ...] = tuple(request_ids)
        self.adapter_names: Tuple[Optional[str], ...] = tuple(adapter_names)
        self.lengths: Tuple[int, ...] = tuple(int(n) for n in lengths)
        offs = [0]
        for n in self.lengths:
            offs.append(offs[-1] + n)
        self.seq_offsets = torch.tensor(offs, dtype=torch.long, device=device)
        self.gates: List[Optional[Tensor]] = list(gates)
        # steps with the same sequences, all of them already routed, reuse the previous step's tensors
        self.key = (self.request_ids, self.adapter_names, self.lengths) if all(g is not None for g in self.gates) else None

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def routed_now(self) -> List[int]:
        """Sequences whose prompt is routed in this step."""
        return [s for s, g in enumerate(self.gates) if g is None]


def plan_step(requests_in_batch, store: GateStore, device) -> PackedStep:
    """The PackedStep of the engine's scheduled requests (FutureRequestState list, in batch order)."""
    rids, names, lengths, gates = [], [], [], []
    for fs in requests_in_batch:
        state = fs.state
        rid = state.request_id
        q = int(fs.query_length)
        g = store.gates(rid)
        if g is None:
            past = int(state.position_offset) - q  # the engine advanced position_offset when it packed the step
            if past != 0 or q != len(state.initial_tokens):
                raise RuntimeError(
                    f"MiLoRA continuous batching: request {rid!r} reached the model with {q} of its "
                    f"{len(state.initial_tokens)} prompt tokens after {past} cached ones; MiLoRA routes each request "
                    "once from its whole prompt, so prompts must not be chunked or prefix-shared")
        rids.append(rid)
        names.append(store.adapter(rid))
        lengths.append(q)
        gates.append(g)
    return PackedStep(rids, names, lengths, gates, device)


# ---- the plan of one engine step (milora.routing's types) -----------------------------------


class StepPlan:
    """The routing of one engine step: the BatchPlan the adapted linears read (seq_offsets of the
    packed row, one adapter slot and one gate row per sequence; per token for MOELoRA rows), the
    per-request gates it was built from ([layers, 7, S, E]) and where this step's new prompts are
    in the packed row (for routing them)."""

    __slots__ = ("request", "plan", "G", "new", "routed", "tok_seq", "seg_index", "seg_mask", "routed_idx",
                 "routed_slots", "routed_present")


class _PackedRouting:
    """Builds the BatchPlan of each engine step from its PackedStep and runs the step inside
    `model.routing(request, plan=plan)` (the model then uses that plan instead of building one for
    the [B, L] layout). New prompts are routed during the step's forward, each pooled over its own
    segment of the packed row, by decoder-layer pre-hooks (installed once per engine, acting only in
    the engine thread's step forward): they write the layer's gates into the plan before the
    layer's linears run. Nothing else writes the plan."""

    def __init__(self, model) -> None:
        self.model = model
        self._last = None  # (key, adapter version, StepPlan) of the previous step, reused when nothing changed
        self._running = None  # (CallContext, PackedStep, StepPlan) of the step running in the engine thread
        self._hooks: list = []

    def install(self) -> None:
        """Hooks on the decoder stack and layers, installed once per engine; they act only in the
        forward of an engine step (the call context of the running thread is the step's), so
        forwards of other threads on the same model never see them."""
        if self._hooks:
            return
        m = self.model
        self._hooks = [m.base_model.model.register_forward_pre_hook(self._check_shape, with_kwargs=True)]
        self._hooks += [layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
                        for i, layer in enumerate(m.layers)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _mine(self):
        from .routing import current_call

        running = self._running
        return running if running is not None and current_call() is running[0] else None

    def _check_shape(self, module, args, kwargs):
        running = self._mine()
        if running is None:
            return None
        step = running[1]
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None or x.shape[0] != 1 or x.shape[1] != step.num_tokens:
            raise RuntimeError(f"MiLoRA continuous batching: the engine's forward has shape "
                               f"{None if x is None else tuple(x.shape)}, expected one packed row of "
                               f"{step.num_tokens} tokens")
        return None

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            running = self._mine()
            if running is not None and running[2].routed:
                self._route_layer(running[2], i, args[0] if args else kwargs["hidden_states"])
            return None
        return hook

    def _build(self, step: PackedStep) -> StepPlan:
        from .routing import BatchPlan, PromptGates, TokenPlan

        m = self.model
        dev = step.seq_offsets.device
        S, T = len(step.request_ids), step.num_tokens
        req = m._make_request(list(step.adapter_names), S, dev, None, collect_aux=False)
        tables = req.tables
        rows = req.rows(S)
        L, M, E = m.num_layers, len(MODULE_NAMES), tables.static_weights.shape[1]
        per_seq, new = [], []
        for s, (g, slot) in enumerate(zip(step.gates, req.slots)):
            if g is None:
                new.append(s)
                if slot >= 0 and tables.kinds[slot] != "prompt":
                    # router-less (PEFT import) and token-routed adapters: their fixed expert weights x scaling
                    g = tables.scale[:, slot, :].unsqueeze(-1) * tables.static_weights[slot].view(1, 1, E)
                else:  # base (zeros) or a prompt-routed adapter (filled while the step runs)
                    g = torch.zeros(L, M, E, dtype=torch.float32, device=dev)
            elif g.shape[-1] != E:  # adapters with more experts were added since it was stored
                g = torch.nn.functional.pad(g, (0, E - g.shape[-1]))
            per_seq.append(g)
        sp = StepPlan()
        sp.request, sp.new = req, new
        sp.G = torch.stack(per_seq, dim=2).contiguous()  # [L, 7, S, E]
        sp.routed = [s for s in new if req.slots[s] >= 0 and tables.kinds[req.slots[s]] == "prompt"]
        token = sp.tok_seq = None
        if "token" in req.kinds:
            lengths = torch.tensor(step.lengths, dtype=torch.long, device=dev)
            sp.tok_seq = torch.repeat_interleave(torch.arange(S, device=dev), lengths)  # [T] sequence of each token
            token = TokenPlan(1, torch.arange(T + 1, dtype=torch.long, device=dev), rows.slots.index_select(0, sp.tok_seq),
                              rows.is_token.index_select(0, sp.tok_seq), len(req.kinds) > 1, req.token)
        gates = PromptGates(m._routing_key, req.version, rows.key, L, M, max(step.lengths))
        sp.plan = BatchPlan(step.seq_offsets, rows.slots, req.all_base, gates, False, rows, None, token)
        if sp.routed:
            idx = torch.tensor(sp.routed, dtype=torch.long, device=dev)
            lens = torch.tensor([step.lengths[s] for s in sp.routed], dtype=torch.long, device=dev)
            starts = step.seq_offsets.index_select(0, idx)
            pos = torch.arange(int(lens.max()), device=dev)
            sp.seg_mask = pos.unsqueeze(0) < lens.unsqueeze(1)                                       # [R, Lmax]
            sp.seg_index = torch.where(sp.seg_mask, starts.unsqueeze(1) + pos, starts.unsqueeze(1))  # [R, Lmax]
            sp.routed_idx = idx
            sp.routed_slots = rows.slots_clamped.index_select(0, idx)
            sp.routed_present = sorted({req.slots[s] for s in sp.routed})
        else:
            for i in range(L):
                self._fill_layer(sp, i)
        return sp

    def _fill_layer(self, sp: StepPlan, i: int) -> None:
        """Layer i's gates in the plan: [S, E_linear] per adapted linear (per token [T, E] with MOELoRA rows)."""
        row = sp.plan.gates.per_layer[i]
        for mi, E in enumerate(sp.request.tables.experts[i]):
            if E is None:
                continue
            g = sp.G[i, mi]
            if g.shape[-1] != E:
                g = g[:, :E].contiguous()
            if sp.tok_seq is not None:
                g = g.index_select(0, sp.tok_seq)
            row[mi] = g

    def _route_layer(self, sp: StepPlan, i: int, hidden: Tensor) -> None:
        """Route the step's new prompts at layer i, each pooled over its own segment of the packed row."""
        h = hidden.reshape(-1, hidden.shape[-1])
        seg = h.index_select(0, sp.seg_index.reshape(-1)).view(*sp.seg_index.shape, h.shape[-1])
        scale = sp.request.tables.scale[i].index_select(0, sp.routed_slots)  # [R, 7]
        out = self.model.routers[i](seg, mask=sp.seg_mask, slots=sp.routed_slots, module_mask=scale > 0,
                                    slots_present=sp.routed_present)
        gates = out.gates * scale.unsqueeze(-1)  # [R, 7, E]
        sp.G[i].index_copy_(1, sp.routed_idx, gates.transpose(0, 1).to(sp.G.dtype))
        self._fill_layer(sp, i)

    @contextlib.contextmanager
    def step(self, step: PackedStep):
        m = self.model
        version = m._version
        last = self._last
        if step.key is not None and last is not None and last[0] == step.key and last[1] == version:
            sp = last[2]
        else:
            sp = self._build(step)

        self.install()
        try:
            with m.routing(sp.request, plan=sp.plan) as ctx:
                self._running = (ctx, step, sp)
                yield sp
        finally:
            self._running = None
        # decode steps of an unchanged set of requests reuse this step's plan
        self._last = (step.key, version, sp) if step.key is not None else None

    @staticmethod
    def new_gates(step: PackedStep, sp: StepPlan) -> Dict[str, Tensor]:
        """The gates of the sequences first seen in this step, [layers, 7, E] each, by request id."""
        return {step.request_ids[s]: sp.G[:, :, s, :].clone() for s in sp.new}


# ---- the manager ----------------------------------------------------------------------------


def _validated_cb_config(cb_config, ContinuousBatchingConfig):
    """A copy of the user's continuous-batching config with what MiLoRA cannot serve refused or off."""
    import copy

    cfg = ContinuousBatchingConfig() if cb_config is None else copy.copy(cb_config)
    bad = []
    ucg = cfg.use_cuda_graph
    if ucg is True or (isinstance(ucg, (tuple, list)) and any(ucg)) or cfg.q_padding_interval_size or cfg.kv_padding_interval_size:
        bad.append("CUDA graphs (use_cuda_graph / *_padding_interval_size)")
    if cfg.varlen_compile_config is not None or cfg.decode_compile_config is not None or cfg.default_compile_level:
        bad.append("compiled engine steps (varlen/decode_compile_config, default_compile_level)")
    if cfg.use_async_batching:
        bad.append("use_async_batching")
    if bad:
        raise ValueError("MiLoRA continuous batching does not support " + ", ".join(bad) + ": the per-step routing "
                         "(which adapter and gates each packed sequence uses) runs in Python around every step")
    cfg.use_cuda_graph = False
    cfg.use_async_batching = False
    cfg.allow_block_sharing = False
    return cfg


def _manager_class():
    continuous_api, ContinuousBatchingConfig, GenerationConfig, RequestStatus = _cb_modules()
    Base = continuous_api.ContinuousBatchingManager

    class MiLoRAContinuousBatchingManager(Base):
        """transformers' ContinuousBatchingManager serving a MiLoRAModel, one adapter per request.

        `add_request(..., adapter_name=...)`: the adapter of that request (None or "base": the base
        model; default: the model's active adapter). Everything else is transformers' manager: start,
        stop, get_result, request_id_iter, cancel_request, pause, the context manager. See the module
        docstring for how a packed step is routed and what is refused."""

        def __init__(self, milora_model, generation_config, continuous_batching_config=None, workload_hints=None):
            cfg = _validated_cb_config(continuous_batching_config, ContinuousBatchingConfig)
            n_ret = getattr(generation_config, "num_return_sequences", None) or 1
            if n_ret != 1:
                raise ValueError(f"MiLoRA continuous batching: num_return_sequences={n_ret} is not supported (the engine "
                                 "forks a request from a partly prefilled prompt); give the prompt several times instead")
            self.milora_model = milora_model
            self.store = GateStore()
            self._routing = _PackedRouting(milora_model)
            super().__init__(milora_model.base_model, generation_config, cfg, workload_hints)
            self._routing.install()
            resolved = self.continuous_batching_config
            if resolved.varlen_compile_config is not None or resolved.decode_compile_config is not None:
                raise ValueError("MiLoRA continuous batching: the model config asks for a compiled engine step "
                                 "(compile_config); not supported")

        def destroy(self) -> None:
            super().destroy()
            self._routing.remove()

        # -- requests --

        def _adapter_of(self, adapter_name) -> Optional[str]:
            m = self.milora_model
            if adapter_name is ACTIVE_ADAPTER:
                return m.active_adapter
            if adapter_name in BASE_NAMES:
                return None
            if not isinstance(adapter_name, str) or adapter_name not in m.adapters:
                raise ValueError(f"MiLoRA: unknown adapter {adapter_name!r}; loaded adapters: {list(m.adapters)} "
                                 "(None or 'base' = base model)")
            return adapter_name

        def add_request(self, input_ids, request_id: Optional[str] = None, max_new_tokens: Optional[int] = None,
                        streaming: bool = False, record_timestamps: bool = False, eos_token_id=None,
                        adapter_name: Any = ACTIVE_ADAPTER, **logit_processor_kwargs) -> Optional[str]:
            """transformers' add_request plus `adapter_name` (None / "base": base model; default: the
            active adapter). A prompt is prefilled whole: it must fit in the engine's max_batch_tokens."""
            name = self._adapter_of(adapter_name)
            if len(input_ids) == 0:
                raise ValueError("MiLoRA continuous batching: empty prompt (MiLoRA routes from the prompt)")
            if request_id is None:
                with self._request_lock:
                    request_id = f"req_{self._request_counter}"
                    self._request_counter += 1
            self.store.add(request_id, name)
            rid = super().add_request(input_ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                      streaming=streaming, record_timestamps=record_timestamps,
                                      eos_token_id=eos_token_id, **logit_processor_kwargs)
            if rid is None:
                self.store.discard(request_id)
            return rid

        def add_requests(self, inputs, max_new_tokens: Optional[int] = None, streaming: bool = False,
                         record_timestamps: bool = False, adapter_names: Optional[Sequence] = None,
                         **logit_processor_kwargs) -> List[str]:
            """transformers' add_requests plus `adapter_names` (one per input; default: the active
            adapter for all)."""
            if adapter_names is None:
                adapter_names = [ACTIVE_ADAPTER] * len(inputs)
            elif isinstance(adapter_names, str) or len(adapter_names) != len(inputs):
                raise ValueError(f"MiLoRA: adapter_names must be a list with one adapter name (or None / 'base') per "
                                 f"request; got {adapter_names!r} for {len(inputs)} requests")
            names = [self._adapter_of(n) for n in adapter_names]  # all validated before any is queued
            eos = self.generation_config.eos_token_id
            eos = self.model.config.eos_token_id if eos is None else eos
            eos = -1 if eos is None else eos
            return [self.add_request(ids, max_new_tokens=max_new_tokens, streaming=streaming,
                                     record_timestamps=record_timestamps, eos_token_id=eos,
                                     adapter_name=n if n is not None else "base", **logit_processor_kwargs)
                    for ids, n in zip(inputs, names)]

        # -- the engine thread --

        def _create_batch_processor(self):
            bp = super()._create_batch_processor()
            _schedule_whole_prompts(bp.scheduler)
            return bp

        def _generation_loop_body(self, batch_processor, bootstrapping: bool) -> bool:
            sched = batch_processor.scheduler
            while getattr(sched, "unschedulable", None):
                state, budget = sched.unschedulable.pop()
                batch_processor._handle_request_error(ValueError(
                    f"MiLoRA continuous batching: the prompt of request {state.request_id!r} has "
                    f"{len(state.remaining_prefill_tokens)} tokens, more than the engine's max_batch_tokens={budget}; "
                    "MiLoRA prefills each prompt in one step (raise max_batch_tokens)"), state)
                self.store.discard(state.request_id)
            return super()._generation_loop_body(batch_processor, bootstrapping)

        def _generation_step(self) -> None:
            bp = self.batch_processor
            if bp is None:
                raise RuntimeError("Tried to perform a generation step before the batch processor was initialized.")
            step = plan_step(bp.inputs_and_outputs.requests_in_batch, self.store, bp.model_device)
            with self._routing.step(step) as sp:
                bp._generation_step(self.model)
            for rid, g in self._routing.new_gates(step, sp).items():
                self.store.set_gates(rid, g)
            sched = bp.scheduler
            if len(self.store) > 2 * (len(sched.active_requests) + len(sched.waiting_requests)) + 64:
                self.store.prune(set(sched.active_requests) | set(sched.waiting_requests) | set(step.request_ids))

    return MiLoRAContinuousBatchingManager


_MANAGER_CLASS = None


def manager_class():
    """The MiLoRAContinuousBatchingManager class (built on first use: it subclasses transformers')."""
    global _MANAGER_CLASS
    if _MANAGER_CLASS is None:
        _MANAGER_CLASS = _manager_class()
    return _MANAGER_CLASS


# ---- the model's entry points ----------------------------------------------------------------


class ContinuousBatchingMixin:
    """MiLoRAModel's continuous-batching entry points, with transformers' signatures plus adapters."""

    @torch.no_grad()
    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' init_continuous_batching for a MiLoRA model: a manager whose add_request takes
        `adapter_name`. Prefix sharing is off, prompts are never chunked, CUDA graphs / compile /
        async batching are refused (see milora.continuous_batching)."""
        cached = self.__dict__.get("_cached_continuous_batching_manager")
        if cached is not None:
            cached.switch_to_cb_friendly_attn(self.base_model, cached.continuous_batching_config.auto_switch_to_flash)
            return cached
        gen_config = generation_config if generation_config is not None else self.base_model.generation_config
        if gen_config is None:
            raise ValueError("A GenerationConfig must be provided or set in the model.")
        if gen_config.eos_token_id is None:
            gen_config.eos_token_id = -1
        return manager_class()(self, gen_config, continuous_batching_config, workload_hints)

    def destroy_cached_continuous_batching_manager(self) -> None:
        """Destroy the manager kept by `persistent_manager=True` / `stop(keep_for_next_session=True)`."""
        cached = self.__dict__.pop("_cached_continuous_batching_manager", None)
        if cached is not None:
            cached.destroy()

    @contextlib.contextmanager
    def continuous_batching_context_manager(self, generation_config=None, block: bool = True, timeout=None,
                                            continuous_batching_config=None, persistent_manager: bool = False,
                                            warmup: bool = True, workload_hints=None):
        """transformers' continuous_batching_context_manager for a MiLoRA model."""
        manager = self.init_continuous_batching(generation_config, continuous_batching_config, workload_hints)
        if warmup and not manager.warmed_up:
            manager.warmup()
        manager.start()
        try:
            yield manager
        finally:
            manager.stop(block=block, timeout=timeout, keep_for_next_session=persistent_manager)
            if persistent_manager:
                self.__dict__["_cached_continuous_batching_manager"] = manager
                manager.model.__dict__.pop("_cached_continuous_batching_manager", None)
            else:
                manager.destroy()

    @torch.no_grad()
    def generate_batch(self, inputs, generation_config=None, adapter_names: Optional[Sequence] = None, *,
                       continuous_batching_config=None, record_timestamps: bool = False, progress_bar: bool = False,
                       persistent_manager: bool = False, warmup: bool = True, **kwargs):
        """transformers' generate_batch with one adapter per prompt.

        inputs: list of prompts (token id lists); adapter_names: one adapter name per prompt (None or
        "base": base model), default the active adapter for all. Returns transformers' dict
        request id -> GenerationOutput, in input order. Each request is routed once from its whole
        prompt; greedy tokens equal `generate(..., adapter_names=[name])` of that prompt alone."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        if not inputs:
            return {}
        if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(inputs)):
            raise ValueError(f"MiLoRA: adapter_names must be a list with one adapter name (or None / 'base') per "
                             f"prompt; got {adapter_names!r} for {len(inputs)} prompts")
        gen_cfg = self.base_model.generation_config if generation_config is None else generation_config
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        if kwargs:
            raise TypeError(f"generate_batch: unexpected keyword arguments {sorted(kwargs)}")
        max_new_tokens = gen_cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        hints = WorkloadHints(max_prompt_length=max(len(p) for p in inputs),
                              max_generated_length=max_new_tokens if max_new_tokens is not None else 0,
                              num_requests=len(inputs))
        results: Dict[str, Any] = {}
        with self.continuous_batching_context_manager(generation_config=generation_config, block=True, timeout=5,
                                                      continuous_batching_config=continuous_batching_config,
                                                      persistent_manager=persistent_manager, warmup=warmup,
                                                      workload_hints=hints) as manager:
            ids = manager.add_requests(inputs, max_new_tokens=max_new_tokens, record_timestamps=record_timestamps,
                                       adapter_names=adapter_names)
            pending = set(ids)
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(ids), disable=not progress_bar, desc=f"Solving {len(ids)} requests", unit="request")
            except ImportError:  # pragma: no cover
                bar = contextlib.nullcontext()
            with bar:
                while pending:
                    out = manager.get_result(timeout=1)
                    if out is not None:
                        if out.is_finished() and out.request_id in pending:
                            results[out.request_id] = out
                            pending.discard(out.request_id)
                            if progress_bar:
                                bar.update(1)
                    elif not manager.is_running():
                        break
        if pending:
            err = manager.background_thread_status.fatal_error
            raise RuntimeError(f"MiLoRA generate_batch: the engine stopped before requests {sorted(pending)} finished"
                               + (f": {err}" if err is not None else "")) from err
        return {rid: results[rid] for rid in ids}
