"""Behaviour 1: routing runs once per prompt, during prefill; gates are reused while decoding."""
import threading

import pytest
import torch

from milora import MiLoRAConfig, gates_of
from milora_test_utils import generate_with_gates, OpSpy, count_router_calls, milora_model, randomize_adapter


@pytest.fixture(scope="module")
def two_adapter_model():
    model, ref = milora_model(seed=0)
    model.add_adapter("b", MiLoRAConfig(r=8, alpha=16, top_k=2, gate_mode="hard", pooler="mean"))
    randomize_adapter(model, "b", 7)
    model.eval()
    return model, ref


def _ids(b, l, seed=0):
    return torch.randint(1, 128, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_routers_run_only_at_prefill(two_adapter_model, monkeypatch, mode):
    model, _ = two_adapter_model
    spy = OpSpy(monkeypatch)
    counter, handles = count_router_calls(model)
    ids = _ids(2, 6)
    kw = dict(greedy=dict(do_sample=False), sample=dict(do_sample=True, top_k=0, num_return_sequences=2),
              beam=dict(do_sample=False, num_beams=3))[mode]
    try:
        torch.manual_seed(0)
        out, gates = generate_with_gates(model, input_ids=ids, adapter_names=["default", "b"], max_new_tokens=6,
                                         min_new_tokens=6, **kw)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[1] == 12
    assert counter["n"] == model.num_layers  # once per layer, for the whole generate call
    # every step of a linear uses the very same gates tensor computed at prefill
    by_linear = {}
    for c in spy.calls:
        by_linear.setdefault(id(c["weight"]), []).append(c["gates_obj"])
    for objs in by_linear.values():
        assert all(o is objs[0] for o in objs)
    # one op call per step for each linear some row uses; a linear no row uses never calls the op
    steps = {len(objs) for objs in by_linear.values()}
    assert len(steps) == 1 and steps.pop() >= 6  # prefill + a decode step per further token
    modules = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 4, "up_proj": 5, "down_proj": 6}
    for (layer, module), lin in model.milora_linears().items():
        g = gates[layer][modules[module]]
        assert (id(lin.weight) in by_linear) == bool(g is not None and g.ne(0).any()), (layer, module)
    # rows expanded for beams / samples share their prompt's gates
    expand = {"greedy": 1, "sample": 2, "beam": 3}[mode]
    for layer in gates:
        for g in layer:
            if g is not None:
                assert g.shape[0] == 2 * expand
                grouped = g.view(2, expand, -1)
                assert torch.equal(grouped, grouped[:, :1].expand_as(grouped))


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_rows_of_a_batch_generate_like_alone(two_adapter_model, mode):
    """Beam search reorders the KV cache within a prompt's beams; gates must stay aligned."""
    model, _ = two_adapter_model
    ids = _ids(3, 5, seed=3)
    names = ["b", "default", "base"]
    kw = dict(do_sample=False, max_new_tokens=5, num_beams=1 if mode == "greedy" else 3)
    batch = model.generate(input_ids=ids, adapter_names=names, **kw)
    for i, n in enumerate(names):
        alone = model.generate(input_ids=ids[i:i + 1], adapter_names=[n], **kw)
        assert torch.equal(alone[0], batch[i])


def test_left_padding_is_excluded_from_pooling(two_adapter_model):
    model, _ = two_adapter_model
    ids = _ids(2, 7, seed=4)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    ids[1, :3] = 0
    out, g_batch = generate_with_gates(model, input_ids=ids, attention_mask=am, adapter_names=["default", "default"],
                                       max_new_tokens=4, do_sample=False)
    alone, g_alone = generate_with_gates(model, input_ids=ids[1:2, 3:], adapter_names=["default"], max_new_tokens=4,
                                         do_sample=False)
    assert torch.equal(alone[0], out[1, 3:])
    for lb, la in zip(g_batch, g_alone):
        for gb, ga in zip(lb, la):
            if gb is not None:
                torch.testing.assert_close(gb[1:2], ga, rtol=1e-5, atol=1e-6)
    selected = torch.stack([g[1] != 0 for g in g_batch[0] if g is not None])
    assert selected.sum() == 3  # top_k = 3 modules on


def test_consecutive_generate_calls_reset_the_state(two_adapter_model):
    model, _ = two_adapter_model
    counter, handles = count_router_calls(model)
    try:
        a, b = _ids(2, 6, seed=10), _ids(2, 6, seed=11)
        _, want = generate_with_gates(model, input_ids=b, adapter_names=["b", "default"], max_new_tokens=3, do_sample=False)
        _, first = generate_with_gates(model, input_ids=a, adapter_names=["default", "b"], max_new_tokens=3, do_sample=False)
        _, second = generate_with_gates(model, input_ids=b, adapter_names=["b", "default"], max_new_tokens=3,
                                        do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert counter["n"] == 3 * model.num_layers
    differs = False
    for lw, l1, l2 in zip(want, first, second):
        for gw, g1, g2 in zip(lw, l1, l2):
            if gw is not None:
                assert torch.equal(gw, g2)
                differs |= not torch.equal(g1, g2)
    assert differs


def test_gates_hold_scaling_and_top_k(two_adapter_model):
    model, _ = two_adapter_model
    ids = _ids(2, 6, seed=5)
    _, gates = generate_with_gates(model, input_ids=ids, adapter_names=["default", "b"], max_new_tokens=1, do_sample=False)
    for layer in gates:
        g = torch.cat([x for x in layer if x is not None], 1)  # [B, 7]
        assert ((g != 0).sum(1) == torch.tensor([3, 2])).all()
        # default: soft gates renormalised over the top 3, times alpha / r = 2
        assert g[0].sum().item() == pytest.approx(2.0, rel=1e-5)
        # b: hard gates = alpha / r = 2 on the two selected modules
        assert sorted(g[1].unique().tolist()) == [0.0, 2.0]


def test_forward_with_cache_reuses_gates(two_adapter_model):
    """A manual prefill + decode through MiLoRAModel.forward routes only at the prefill."""
    model, _ = two_adapter_model
    counter, handles = count_router_calls(model)
    ids = _ids(2, 5, seed=6)
    try:
        out = model(input_ids=ids, use_cache=True, adapter_names=["b", "default"])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, cache=out.cache, use_cache=True, adapter_names=["b", "default"])
    finally:
        for h in handles:
            h.remove()
    assert counter["n"] == model.num_layers
    full = model(input_ids=torch.cat([ids, nxt], 1), adapter_names=["b", "default"], prompt_mask=torch.cat(
        [torch.ones_like(ids), torch.zeros_like(nxt)], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_generate_without_kv_cache_routes_once(two_adapter_model):
    model, _ = two_adapter_model
    ids = _ids(2, 5, seed=12)
    with_cache = model.generate(input_ids=ids, adapter_names=["b", "default"], max_new_tokens=4, do_sample=False)
    counter, handles = count_router_calls(model)
    try:
        no_cache = model.generate(input_ids=ids, adapter_names=["b", "default"], max_new_tokens=4, do_sample=False,
                                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert counter["n"] == model.num_layers  # routed from the prompt only, not from generated tokens
    assert torch.equal(no_cache, with_cache)


# ---- gates belong to the request and its KV cache ------------------------------------------------


def _greedy_step(model, out, names):
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return nxt, model(input_ids=nxt, cache=out.cache, use_cache=True, adapter_names=names)


def test_interleaved_manual_decoding_uses_each_caches_own_gates(two_adapter_model):
    """Prefill A, prefill B, decode A with A's cache: exactly A decoded alone."""
    model, _ = two_adapter_model
    ids_a, ids_b = _ids(2, 6, seed=20), _ids(3, 4, seed=21)
    names_a, names_b = ["default", "b"], ["b", "b", "default"]
    with torch.no_grad():
        a = model(input_ids=ids_a, use_cache=True, adapter_names=names_a)
        b = model(input_ids=ids_b, use_cache=True, adapter_names=names_b)
        nxt_a, step_a = _greedy_step(model, a, names_a)
        nxt_b, step_b = _greedy_step(model, b, names_b)
        a2 = model(input_ids=torch.cat([ids_a, nxt_a], 1), cache=step_a.cache, use_cache=True, adapter_names=names_a)
        # A alone, then B alone
        ref_a = model(input_ids=ids_a, use_cache=True, adapter_names=names_a)
        _, ref_step_a = _greedy_step(model, ref_a, names_a)
        ref_b = model(input_ids=ids_b, use_cache=True, adapter_names=names_b)
        _, ref_step_b = _greedy_step(model, ref_b, names_b)
    assert torch.equal(step_a.logits, ref_step_a.logits)
    assert torch.equal(step_b.logits, ref_step_b.logits)
    assert a2.logits.shape[1] == 7  # a multi-token continuation reads the same cache's gates
    # the gates stored with A's cache are A's, computed from A's prompt
    ga, gb = gates_of(step_a.cache), gates_of(step_b.cache)
    assert ga is not gb and ga.batch_size == 2 and gb.batch_size == 3
    assert torch.equal(ga.per_layer[0][0], gates_of(ref_a.cache).per_layer[0][0])


def test_continuation_of_a_cache_without_gates_is_refused(two_adapter_model):
    model, ref = two_adapter_model
    ids = _ids(2, 5, seed=22)
    with torch.no_grad():
        plain = ref(input_ids=ids, use_cache=True)  # an HF model that is not wrapped: no MiLoRA gates
        with pytest.raises(ValueError, match="holds no MiLoRA routing"):
            model(input_ids=ids[:, :1], cache=plain.cache, use_cache=True)


def test_continuation_with_other_adapters_is_refused(two_adapter_model):
    model, _ = two_adapter_model
    ids = _ids(2, 5, seed=23)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, adapter_names=["default", "b"])
        with pytest.raises(ValueError, match=r"routed for rows with adapters \['default', 'b'\]"):
            model(input_ids=ids[:, :1], cache=out.cache, use_cache=True, adapter_names=["b", "b"])


def test_continuation_after_adapter_change_is_refused():
    model, _ = milora_model(seed=3)
    ids = _ids(1, 5, seed=24)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        model.add_adapter("late", MiLoRAConfig(r=2, alpha=4))
        with pytest.raises(ValueError, match="adapters were added or removed"):
            model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)


@pytest.mark.parametrize("names", [["default", "b"], ["base", "b"]])
def test_generate_from_a_prefix_cache_routes_from_the_whole_prompt(two_adapter_model, names):
    model, _ = two_adapter_model
    ids = _ids(2, 9, seed=25)
    kw = dict(max_new_tokens=4, do_sample=False, adapter_names=names)
    want, want_gates = generate_with_gates(model, input_ids=ids, **kw)
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :5], use_cache=True, adapter_names=names).cache  # routed from 5 tokens
    got, got_gates = generate_with_gates(model, input_ids=ids, cache=prefix, **kw)
    assert torch.equal(got, want)
    for lw, lg in zip(want_gates, got_gates):
        for gw, gg in zip(lw, lg):
            if gw is not None:
                torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-6)


def test_direct_calls_of_the_wrapped_model_route_per_call(two_adapter_model):
    """HF code that calls the wrapped model itself (its generate, pipelines) gets the active
    adapter, routed from each prompt, with the gates kept on its own cache."""
    model, _ = two_adapter_model
    ids = _ids(2, 6, seed=26)
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(model.base_model.generate(input_ids=ids, **kw), model.generate(input_ids=ids, **kw))


def test_threads_generate_like_sequential_calls(two_adapter_model):
    """4 threads x 3 generate calls on one model give exactly the tokens of sequential calls."""
    model, _ = two_adapter_model
    jobs = []
    for t in range(4):
        for c in range(3):
            B, L = 1 + (t + c) % 3, 4 + (3 * t + c) % 5
            names = [["default", "b", "base"][(t + c + r) % 3] for r in range(B)]
            jobs.append((t, _ids(B, L, seed=100 + 10 * t + c), names))
    kw = dict(max_new_tokens=5, do_sample=False)
    want = {i: model.generate(input_ids=ids, adapter_names=names, **kw) for i, (_, ids, names) in enumerate(jobs)}
    got, errors = {}, []
    barrier = threading.Barrier(4)

    def worker(t):
        try:
            barrier.wait()
            for i, (tt, ids, names) in enumerate(jobs):
                if tt == t:
                    got[i] = model.generate(input_ids=ids, adapter_names=names, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i in want:
        assert torch.equal(got[i], want[i]), i


def test_a_caller_built_plan_is_used_for_every_forward(two_adapter_model, monkeypatch):
    """A continuous-batching engine builds its own BatchPlan (rows gathered from separately
    routed requests); every linear reads that plan, and rows equal the requests run alone."""
    from milora.routing import BatchPlan, PromptGates
    model, _ = two_adapter_model
    prompts = [(_ids(1, 5, seed=30), "b"), (_ids(1, 7, seed=31), "default")]
    with torch.no_grad():
        stored = [gates_of(model(input_ids=ids, use_cache=True, adapter_names=[n]).cache) for ids, n in prompts]
    x = _ids(2, 3, seed=32)
    names = [n for _, n in prompts]
    req = model._make_request(names, 2, x.device, None, collect_aux=False)
    rows = req.rows(2)
    gates = PromptGates(model._routing_key, req.version, rows.key, model.num_layers, 7, 0)
    for i in range(model.num_layers):
        for m in range(7):
            if stored[0].per_layer[i][m] is not None:
                gates.per_layer[i][m] = torch.cat([g.per_layer[i][m] for g in stored])
    plan = BatchPlan(req.offsets(2, 3), rows.slots, False, gates, False, rows, None, None)
    spy = OpSpy(monkeypatch)
    with torch.no_grad(), model.routing(req, plan):
        both = model.base_model(input_ids=x).logits
    assert spy.calls and all(c["gates_obj"] is gates.per_layer[0][0] for c in spy.calls[:1])
    for r, g in enumerate(stored):
        alone_req = model._make_request([names[r]], 1, x.device, None, collect_aux=False)
        arows = alone_req.rows(1)
        alone_plan = BatchPlan(alone_req.offsets(1, 3), arows.slots, False, g, False, arows, None, None)
        with torch.no_grad(), model.routing(alone_req, alone_plan):
            alone = model.base_model(input_ids=x[r:r + 1]).logits
        torch.testing.assert_close(both[r:r + 1], alone, rtol=1e-5, atol=1e-5)


def test_unused_modules_skip_the_op_and_give_the_same_tokens(two_adapter_model, monkeypatch):
    """With top-k of 7 modules per prompt, a linear that no row of the batch uses is the base
    layer alone: inference skips the op there, with the tokens of the op-on-every-linear path."""
    import milora.routing as routing_mod

    model, _ = two_adapter_model
    ids = _ids(1, 7, seed=3)
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        fast = model.generate(input_ids=ids, adapter_names=["b"], max_new_tokens=5, do_sample=False)
    n_fast = len(spy.calls)
    spy.reset()
    monkeypatch.setattr(routing_mod.PromptGates, "skips", lambda self, layer, module: False)
    with torch.no_grad():
        every = model.generate(input_ids=ids, adapter_names=["b"], max_new_tokens=5, do_sample=False)
    assert torch.equal(fast, every)
    # adapter "b" keeps top-2 of 7 modules: one row -> at most 2 of 7 linears per layer call the op
    assert n_fast <= len(spy.calls) * 2 / 7 + 1e-9 and n_fast > 0
