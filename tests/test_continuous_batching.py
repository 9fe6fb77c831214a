"""Continuous batching (transformers' ContinuousBatchingManager) with one adapter per request:
tokens equal per-request generate whatever the arrival order and mix; one op call per adapted
linear per engine step over the packed ragged batch; prompts routed whole; clear errors."""
import pytest
import torch

from milora import MiLoRAConfig
from milora_test_utils import OpSpy, milora_model, randomize_adapter

transformers = pytest.importorskip("transformers")
cb_config_mod = pytest.importorskip("transformers.generation.configuration_utils")
if not hasattr(cb_config_mod, "ContinuousBatchingConfig"):
    pytest.skip("this transformers has no continuous batching", allow_module_level=True)
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

NEW = 6


def cb_config(max_batch_tokens=64, **kw):
    # a small paged cache: transformers sizes it from free memory otherwise (seconds to allocate on CPU)
    return ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=max_batch_tokens, page_size=16, **kw)


def gen_config(new=NEW):
    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    from milora.bench.generate import write_peft_adapters

    model, ref = milora_model(seed=3, adapter_name="a")
    model.add_adapter("b", MiLoRAConfig(r=8, alpha=8, top_k=2, pooler="max", activation="gelu"))
    model.add_adapter("t", MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=4, top_k=2,
                                        target_modules=["q_proj", "up_proj"]))
    for i, n in enumerate(["b", "t"]):
        randomize_adapter(model, n, 30 + i)
    ref.requires_grad_(False)
    d = write_peft_adapters(ref, str(tmp_path_factory.mktemp("peft")), ["p"], rank=4, alpha=8.0, seed=5)["p"]
    model.load_peft_adapter(d, "p")  # a plain LoRA adapter in standard PEFT files (router-less)
    model.eval()
    return model


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, name, new=NEW):
    out = model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=new,
                         min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


class Steps:
    """Records the packed layout (cu_seq_lens_q) of every engine step."""

    def __init__(self, model):
        self.layouts = []
        self.handle = model.base_model.model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            cu = cu.tolist()
            self.layouts.append([b - a for a, b in zip(cu, cu[1:])])

    def remove(self):
        self.handle.remove()


def test_generate_batch_equals_generate_per_request(tenants, monkeypatch):
    model = tenants
    names = ["a", "p", "base", "t", "b", None, "a", "t"]
    prompts = prompts_of([5, 9, 3, 12, 7, 4, 11, 6], seed=0)
    steps = Steps(model)
    spy = OpSpy(monkeypatch)
    try:
        out = model.generate_batch(prompts, gen_config(), adapter_names=names, continuous_batching_config=cb_config())
    finally:
        steps.remove()
    op_calls = len(spy.calls)
    assert list(out) == [f"req_{i}" for i in range(len(prompts))]  # transformers' ids, in input order
    base_tokens = []
    for o, p, n in zip(out.values(), prompts, names):
        assert o.error is None and o.prompt_ids == p
        assert o.generated_tokens == alone(model, p, n), n
        base_tokens.append(alone(model, p, "base"))
    adapted = [i for i, n in enumerate(names) if n not in (None, "base")]
    assert sum(list(out.values())[i].generated_tokens != base_tokens[i] for i in adapted) >= len(adapted) - 1
    # one op call per adapted linear per engine step, over the whole packed batch
    n_lin = len(model.milora_linears())
    assert op_calls == n_lin * len(steps.layouts)
    assert any(len(lay) > 1 and max(lay) > 1 for lay in steps.layouts)  # several whole prompts packed in one step
    assert any(len(lay) > 1 and max(lay) == 1 for lay in steps.layouts)  # several requests decoding together


def test_prompt_routed_rows_pass_seq_offsets_of_the_packed_batch(tenants, monkeypatch):
    model = tenants
    prompts = prompts_of([4, 7, 5], seed=1)
    steps = Steps(model)
    spy = OpSpy(monkeypatch)
    try:
        model.generate_batch(prompts, gen_config(3), adapter_names=["a", "b", "base"],
                             continuous_batching_config=cb_config())
    finally:
        steps.remove()
    n_lin = len(model.milora_linears())
    slots = model.adapter_names
    for k, lay in enumerate(steps.layouts):
        offs = [0]
        for n in lay:
            offs.append(offs[-1] + n)
        for c in spy.calls[k * n_lin:(k + 1) * n_lin]:
            assert c["seq_offsets"].tolist() == offs
            assert c["x_shape"][:2] == (1, offs[-1])
            assert c["gates"].shape[0] == len(lay)
    first = spy.calls[0]["adapter_ids"].tolist()
    assert first == [slots.index("a"), slots.index("b"), -1]


def test_arrival_order_and_mix_do_not_change_tokens(tenants):
    model = tenants
    prompts = prompts_of([6, 3, 10, 8, 5], seed=2)
    names = ["b", "t", "a", "p", "base"]
    want = [alone(model, p, n) for p, n in zip(prompts, names)]
    order = [3, 0, 4, 2, 1]
    out = model.generate_batch([prompts[i] for i in order], gen_config(), adapter_names=[names[i] for i in order],
                               continuous_batching_config=cb_config())
    assert [o.generated_tokens for o in out.values()] == [want[i] for i in order]
    # all on one adapter / all different: same tokens for the same (prompt, adapter)
    same = model.generate_batch(prompts, gen_config(), adapter_names=["a"] * 5, continuous_batching_config=cb_config())
    assert [o.generated_tokens for o in same.values()] == [alone(model, p, "a") for p in prompts]


def test_late_request_joins_a_running_manager(tenants):
    """A request added while others decode joins their steps. Meanwhile (engine paused between two
    steps) a generate call of the user on the same model gets its own tokens: routing is per call.
    (Paused, because transformers' engine itself is not safe against a concurrent forward of its
    model in another thread, with or without MiLoRA.)"""
    model = tenants
    early = prompts_of([6, 9], seed=3)
    late = prompts_of([7], seed=4)[0]
    other = prompts_of([6], seed=8)[0]
    steps = Steps(model)
    manager = model.init_continuous_batching(gen_config(), continuous_batching_config=cb_config())
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=16, streaming=True, adapter_name=n)
               for p, n in zip(early, ["a", "t"])]
        first = manager.get_result(timeout=30)  # the early requests are decoding now
        assert first is not None and not first.is_finished()
        with manager.pause():  # deterministic: the late request arrives between two decode steps
            late_id = manager.add_request(late, max_new_tokens=NEW, adapter_name="b")
            during = [alone(model, other, n) for n in ("p", "a")]
        results = {}
        while len(results) < 3:
            o = manager.get_result(timeout=30)
            assert o is not None, "the engine stopped"
            if o.is_finished():
                results[o.request_id] = o
    finally:
        manager.stop(block=True)
        manager.destroy()
        steps.remove()
    assert results[late_id].generated_tokens == alone(model, late, "b")
    for rid, p, n in zip(ids, early, ["a", "t"]):
        assert results[rid].generated_tokens == alone(model, p, n, new=16)
    assert during == [alone(model, other, n) for n in ("p", "a")]
    # the late prompt was prefilled in a step where the early requests decoded
    assert any(len(late) in lay and lay.count(1) >= 2 for lay in steps.layouts)


def test_prompts_are_never_chunked(tenants):
    """A small token budget: transformers would split prompts across steps; MiLoRA waits instead."""
    model = tenants
    prompts = prompts_of([10, 12, 9, 11], seed=5)
    names = ["a", "b", "p", "t"]
    steps = Steps(model)
    try:
        out = model.generate_batch(prompts, gen_config(), adapter_names=names,
                                   continuous_batching_config=cb_config(max_batch_tokens=16))
    finally:
        steps.remove()
    for o, p, n in zip(out.values(), prompts, names):
        assert o.error is None and o.generated_tokens == alone(model, p, n)
    prefills = [n for lay in steps.layouts for n in lay if n > 1]
    assert sorted(prefills) == sorted(len(p) for p in prompts)  # every prompt in one piece


def test_prompt_longer_than_the_token_budget_fails_clearly(tenants):
    model = tenants
    prompts = prompts_of([5, 20], seed=6)
    out = model.generate_batch(prompts, gen_config(), adapter_names=["a", "b"],
                               continuous_batching_config=cb_config(max_batch_tokens=16))
    ok, bad = out.values()
    assert ok.error is None and ok.generated_tokens == alone(model, prompts[0], "a")
    assert bad.error is not None and "max_batch_tokens" in bad.error


def test_bad_arguments_raise(tenants):
    model = tenants
    with pytest.raises(ValueError, match="unknown adapter"):
        model.generate_batch([[1, 2, 3]], gen_config(), adapter_names=["nope"], continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match="one adapter name"):
        model.generate_batch([[1, 2, 3], [4, 5]], gen_config(), adapter_names=["a"], continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match="CUDA graphs"):
        model.init_continuous_batching(gen_config(), continuous_batching_config=cb_config(use_cuda_graph=True))
    with pytest.raises(ValueError, match="async"):
        model.init_continuous_batching(gen_config(), continuous_batching_config=cb_config(use_async_batching=True))
    g = gen_config()
    g.num_return_sequences = 2
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.init_continuous_batching(g, continuous_batching_config=cb_config())


def test_no_fall_through_to_the_base_model(tenants):
    """The base model's engine would serve every request without adapters."""
    model = tenants
    base_cls = type(model.base_model)
    assert type(model).generate_batch is not base_cls.generate_batch
    assert type(model).init_continuous_batching is not base_cls.init_continuous_batching
    with pytest.raises(AttributeError):
        model._cached_continuous_batching_manager  # noqa: B018


def test_gate_store_forgets_only_finished_requests():
    from milora.continuous_batching import GateStore

    store = GateStore()
    for rid, name in (("r0", "a"), ("r1", None), ("r2", "b")):
        store.add(rid, name)
    assert store.adapter("r0") == "a" and store.adapter("r1") is None  # the engine scheduled r0 and r1
    store.set_gates("r0", torch.ones(2, 7, 1))
    store.prune(live={"r1"})  # r0 finished; r2 was added but not scheduled yet: kept
    assert len(store) == 2 and store.gates("r0") is None and store.adapter("r2") == "b"
    with pytest.raises(RuntimeError, match="not added through the MiLoRA manager"):
        store.adapter("r0")
    assert store.adapter("__warmup_DECODING_0__") is None  # the engine's own warm-up requests: base model

