"""Compiled decoding: a decode step traces as one graph, and HF's compiled static-cache
generate gives the eager tokens (on a GPU this is what lets a decode step run as a CUDA graph)."""
import pytest
import torch

from milora_test_utils import milora_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    m, _ = milora_model(seed=0)
    from milora import MiLoRAConfig
    from milora_test_utils import randomize_adapter
    m.add_adapter("b", MiLoRAConfig(r=2, alpha=4, top_k=2))
    randomize_adapter(m, "b", 3)
    m.eval()
    return m


def _ids(b, l, seed):
    return torch.randint(1, 128, (b, l), generator=torch.Generator().manual_seed(seed))


def test_decode_step_traces_without_graph_breaks(model):
    ids = _ids(3, 5, 0)
    names = ["default", "b", "base"]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, adapter_names=names)
        nxt = out.logits[:, -1:].argmax(-1)
        req = model._make_request(names, 3, ids.device, None, collect_aux=False)
        with model.routing(req):
            ex = torch._dynamo.explain(lambda x: model.base_model(input_ids=x, cache=out.cache, use_cache=True).logits)(nxt)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_compiled_static_cache_generate_gives_eager_tokens(model):
    torch._dynamo.reset()
    cc = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    cc._compile_all_devices = True  # HF compiles on CPU only when asked to
    base = model.base_model
    for seed, names in [(1, ["default", "base"]), (2, ["b", "default"])]:
        ids = _ids(2, 6, seed)
        kw = dict(input_ids=ids, adapter_names=names, max_new_tokens=5, do_sample=False, cache_implementation="static")
        eager = model.generate(**kw)
        compiled = model.generate(compile_config=cc, **kw)
        assert hasattr(base, "_compiled_call")  # HF really decoded through torch.compile (fullgraph)
        assert torch.equal(compiled, eager), (names, compiled, eager)
