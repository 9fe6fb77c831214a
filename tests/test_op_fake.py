"""The fake (meta) kernels of the ops reject exactly what the real kernels reject, with the
same exception type and message, so that under torch.compile a bad call fails while tracing."""
import os
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import milora_ext
from milora_ext import ops

from test_op_errors import DTYPE_CASES, SHAPE_CASES, base_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = torch.ops.milora_ext.gated_lora_linear.default
BACKWARD = torch.ops.milora_ext.gated_lora_linear_backward.default


def _on_meta(args):
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _raises_same(fn, args_real, args_fake):
    with pytest.raises(Exception) as real:
        fn(**args_real)
    with pytest.raises(type(real.value), match=re.escape(str(real.value).split("\n")[0])):
        fn(**args_fake)


@pytest.mark.parametrize("name, make, msg", SHAPE_CASES + DTYPE_CASES)
def test_fake_rejects_what_the_cpu_kernel_rejects(name, make, msg):
    args = base_args()
    args[name] = make(base_args())
    _raises_same(lambda **a: OP(*a.values()), args, _on_meta(args))


def test_fake_accepts_what_the_kernel_accepts():
    args = base_args()
    y = OP(*_on_meta(args).values())
    assert y.shape == (5, 8) and y.device.type == "meta"


@pytest.mark.parametrize("name, make, msg", [c for c in SHAPE_CASES + DTYPE_CASES if c[0] != "bias"])
def test_fake_backward_rejects_what_the_backward_rejects(name, make, msg):
    args = base_args()
    args.pop("bias")
    args[name] = make(base_args())
    grad_y = torch.randn(5, 8)

    def call(**a):
        return BACKWARD(a.pop("grad_y"), *a.values(), [True] * 6)

    _raises_same(call, dict(grad_y=grad_y, **args), _on_meta(dict(grad_y=grad_y, **args)))


def test_fake_backward_checks_grad_y():
    args = base_args()
    args.pop("bias")
    for grad_y in (torch.randn(5, 7), torch.randn(5, 8, dtype=torch.float64)):
        _raises_same(lambda **a: BACKWARD(a.pop("grad_y"), *a.values(), [True] * 6),
                     dict(grad_y=grad_y, **args), _on_meta(dict(grad_y=grad_y, **args)))


def _fake_cuda(args):
    mode = FakeTensorMode()
    with mode:
        return {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
                    if isinstance(v, torch.Tensor) else v) for k, v in args.items()}, mode


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        (dict(dtype=torch.float64), TypeError, "the CUDA kernels take float32, float16 or bfloat16 inputs"),
        (dict(E=17), ValueError, "the CUDA kernels support at most 16 experts per adapter, got E = 17"),
        (dict(R=257), ValueError, r"the CUDA kernels support LoRA rank R <= 256, got R = 257"),
    ],
)
def test_fake_applies_the_cuda_limits(change, exc, msg):
    """On (fake) CUDA tensors the fake enforces the CUDA forward's own limits, which the CPU
    kernel does not have. No GPU needed: FakeTensorMode makes CUDA tensors without one."""
    from milora_ext.workloads import make_problem

    E, R, dtype = change.get("E", 2), change.get("R", 4), change.get("dtype", torch.float16)
    p = make_problem([2, 3], [0, 1], K=16, N=8, P=2, E=E, R=R, dtype=dtype)
    args = dict(zip(("x", "weight", "bias", "lora_a", "lora_b", "seq_offsets", "adapter_ids", "gates"), p.args()))
    OP(*args.values())  # the CPU kernel takes it
    fake, mode = _fake_cuda(args)
    with mode, pytest.raises(exc, match=msg):
        OP(*fake.values())


def test_fake_cuda_accepts_a_valid_call():
    fake, mode = _fake_cuda({k: (v.half() if k in ("x", "weight", "bias", "lora_a", "lora_b") else v)
                             for k, v in base_args().items()})
    with mode:
        assert OP(*fake.values()).shape == (5, 8)


def test_cuda_limits_match_launch_h():
    src = open(os.path.join(ROOT, "csrc", "cuda", "launch.h")).read()
    assert re.search(r"kMaxExperts = (\d+);", src).group(1) == str(ops.CUDA_MAX_EXPERTS)
    assert re.search(r"kMaxRank = (\d+);", src).group(1) == str(ops.CUDA_MAX_RANK)


def test_compile_reports_a_bad_call_at_trace_time():
    """Under torch.compile the fake's error surfaces while tracing (before anything runs)."""
    torch._dynamo.reset()
    args = base_args()
    args["lora_b"] = args["lora_b"][:, :, :7]
    compiled = torch.compile(milora_ext.gated_lora_linear, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"lora_b must have shape \[P, E, N, R\] = \[2, 2, 8, 4\]") as err:
        compiled(**args)
    assert "torch._dynamo" in type(err.value).__module__ or isinstance(err.value, ValueError)
