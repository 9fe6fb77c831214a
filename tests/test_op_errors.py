"""Every contract violation raises a Python exception that names the argument."""
import pytest
import torch

import milora_ext
from milora_ext.workloads import make_problem


def base_args():
    p = make_problem([2, 3], [0, 1], K=16, N=8, P=2, E=2, R=4)
    return dict(x=p.x, weight=p.weight, bias=p.bias, lora_a=p.lora_a, lora_b=p.lora_b,
                seq_offsets=p.seq_offsets, adapter_ids=p.adapter_ids, gates=p.gates)


def call(**changes):
    args = base_args()
    args.update(changes)
    return milora_ext.gated_lora_linear(**args)


def test_valid_call_passes():
    assert call().shape == (5, 8)


SHAPE_CASES = [
    ("x", lambda a: a["x"][0, 0], "x must have shape"),
    ("weight", lambda a: a["weight"][0], "weight must have shape"),
    ("weight", lambda a: a["weight"][:, :15], r"weight must have shape \[N, K\] = \[N, 16\]"),
    ("bias", lambda a: a["bias"][:7], r"bias must have shape \[N\] = \[8\]"),
    ("lora_a", lambda a: a["lora_a"][0], "lora_a must have shape"),
    ("lora_a", lambda a: a["lora_a"][..., :15], r"lora_a must have shape \[P, E, R, K\]"),
    ("lora_b", lambda a: a["lora_b"][:, :, :7], r"lora_b must have shape \[P, E, N, R\] = \[2, 2, 8, 4\]"),
    ("lora_b", lambda a: a["lora_b"][:1], r"lora_b must have shape"),
    ("lora_b", lambda a: a["lora_b"][..., :3], r"lora_b must have shape"),
    ("seq_offsets", lambda a: a["seq_offsets"][None], r"seq_offsets must have shape \[S \+ 1\]"),
    ("adapter_ids", lambda a: a["adapter_ids"][:1], r"adapter_ids must have shape \[S\] = \[2\]"),
    ("gates", lambda a: a["gates"][:, :1], r"gates must have shape \[S, E\] = \[2, 2\]"),
    ("gates", lambda a: a["gates"][0], r"gates must have shape"),
]


@pytest.mark.parametrize("name, make, msg", SHAPE_CASES)
def test_bad_shapes(name, make, msg):
    bad = make(base_args())
    with pytest.raises(ValueError, match=msg):
        call(**{name: bad})


DTYPE_CASES = [
    ("x", lambda a: a["x"].to(torch.int32), "x must be float32, float16, bfloat16 or float64"),
    ("weight", lambda a: a["weight"].half(), "weight must have x's dtype"),
    ("bias", lambda a: a["bias"].double(), "bias must have x's dtype"),
    ("lora_a", lambda a: a["lora_a"].bfloat16(), "lora_a must have x's dtype"),
    ("lora_b", lambda a: a["lora_b"].half(), "lora_b must have x's dtype"),
    ("seq_offsets", lambda a: a["seq_offsets"].float(), "seq_offsets must be int32 or int64"),
    ("adapter_ids", lambda a: a["adapter_ids"].float(), "adapter_ids must be int32 or int64"),
    ("gates", lambda a: a["gates"].half(), "gates must be float32"),
    ("gates", lambda a: a["gates"].double(), "gates must be float32"),
]


@pytest.mark.parametrize("name, make, msg", DTYPE_CASES)
def test_bad_dtypes(name, make, msg):
    bad = make(base_args())
    with pytest.raises(TypeError, match=msg):
        call(**{name: bad})


@pytest.mark.parametrize(
    "offsets, msg",
    [
        ([1, 2, 5], "seq_offsets must start at 0"),
        ([0, 4, 3], r"seq_offsets must not decrease, got seq_offsets\[1\] = 4 > seq_offsets\[2\] = 3"),
        ([0, 2, 4], r"seq_offsets must end at T = 5"),
        ([0, 2, 6], r"seq_offsets must end at T = 5"),
        ([0, -1, 5], "seq_offsets must not decrease"),
    ],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_bad_offset_values(offsets, msg, index_dtype):
    with pytest.raises(ValueError, match=msg):
        call(seq_offsets=torch.tensor(offsets, dtype=index_dtype))


@pytest.mark.parametrize("ids", [[0, 2], [5, 0], [0, -2], [-100, 1]])
def test_bad_adapter_ids(ids):
    with pytest.raises(IndexError, match=r"adapter_ids\[\d\] = -?\d+ is out of range: expected -1 \(base only\) or a slot in \[0, P = 2\)"):
        call(adapter_ids=torch.tensor(ids))


def test_mismatched_devices_are_named():
    # A second device: the meta device stands in for a GPU here; CUDA is tested in the CUDA suite.
    a = base_args()
    with pytest.raises(ValueError, match="lora_b must be on x.s device cpu, got meta"):
        call(lora_b=a["lora_b"].to("meta"))


def test_check_indices_op():
    off = torch.tensor([0, 2, 5])
    milora_ext.check_indices(off, torch.tensor([0, -1]), 5, 1)
    with pytest.raises(ValueError, match="seq_offsets must end at T = 6"):
        milora_ext.check_indices(off, torch.tensor([0, -1]), 6, 1)
    with pytest.raises(IndexError, match=r"adapter_ids\[0\] = 1 is out of range"):
        milora_ext.check_indices(off, torch.tensor([1, -1]), 5, 1)
    with pytest.raises(TypeError, match="seq_offsets must be int32 or int64"):
        milora_ext.check_indices(off.float(), torch.tensor([0, -1]), 5, 1)


def test_backward_rejects_bad_grad_shape():
    a = base_args()
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \[5, 8\]"):
        torch.ops.milora_ext.gated_lora_linear_backward(
            torch.randn(5, 7), a["x"], a["weight"], a["lora_a"], a["lora_b"], a["seq_offsets"],
            a["adapter_ids"], a["gates"], [True] * 6)


@pytest.mark.parametrize("name", ["x", "weight", "lora_a", "lora_b", "seq_offsets", "adapter_ids", "gates"])
@pytest.mark.parametrize("value", [None, [1.0, 2.0]])
def test_non_tensor_argument_is_named(name, value):
    # The dispatcher alone would pass None on as an undefined tensor (reported as a shape [0]) and
    # name the schema type of a list, not which argument it was.
    with pytest.raises(TypeError, match=rf"{name} must be a Tensor, got {type(value).__name__}"):
        call(**{name: value})


def test_non_tensor_bias_is_named():
    with pytest.raises(TypeError, match=r"bias must be a Tensor or None, got float"):
        call(bias=1.0)
