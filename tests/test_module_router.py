import pytest
import torch
import torch.nn.functional as F

from milora import PromptRouter, RationalActivation, pool_hidden, switch_load_balance_loss
from milora.router import select_top_k


def test_rational_activation_starts_near_gelu_and_learns():
    act = RationalActivation()
    x = torch.linspace(-5, 5, 1001)
    assert (act(x) - F.gelu(x)).abs().max() < 0.02
    act(x).pow(2).sum().backward()
    assert act.numerator.grad.abs().sum() > 0 and act.denominator.grad.abs().sum() > 0
    assert act.numerator.numel() + act.denominator.numel() == 12


@pytest.mark.parametrize("pooler", ["mean", "max", "last", "self_attn"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_excludes_padding(pooler, side):
    torch.manual_seed(0)
    h = torch.randn(3, 4, 8)
    q = torch.randn(8)
    pad = torch.randn(3, 2, 8) * 100  # garbage at padded positions
    hp = torch.cat([pad, h], 1) if side == "left" else torch.cat([h, pad], 1)
    m = torch.zeros(3, 6, dtype=torch.bool)
    if side == "left":
        m[:, 2:] = True
    else:
        m[:, :4] = True
    want = pool_hidden(h, None, pooler, q)
    got = pool_hidden(hp, m, pooler, q)
    torch.testing.assert_close(got, want)
    if pooler == "last":
        torch.testing.assert_close(want, h[:, -1])
    # a row without prompt token pools to zeros, without NaN
    m[0] = False
    assert torch.equal(pool_hidden(hp, m, pooler, q)[0], torch.zeros(8))


def test_select_top_k_soft_and_hard():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.05, 0.15, 0.1]], requires_grad=True)
    soft = select_top_k(p, 2, False)
    torch.testing.assert_close(soft, torch.tensor([[0, 4 / 7, 0, 3 / 7], [0.7 / 0.85, 0, 0.15 / 0.85, 0]]))
    hard = select_top_k(p, 2, True)
    assert torch.equal(hard.detach(), (soft.detach() > 0).float())
    (hard * torch.arange(4.0)).sum().backward()
    assert p.grad.abs().sum() > 0  # straight-through gradient
    per_row = select_top_k(p.detach(), torch.tensor([1, 3]), torch.tensor([True, False]), k_max=3)
    assert (per_row[0] != 0).sum() == 1 and per_row[0, 1] == 1.0
    assert (per_row[1] != 0).sum() == 3 and per_row[1].sum().item() == pytest.approx(1.0)


def test_switch_loss_values():
    uniform = torch.full((5, 4), 0.25)
    uniform[:, 0] += 1e-3  # top-1 = 0 everywhere
    assert switch_load_balance_loss(uniform).item() == pytest.approx(4 * 0.25, rel=1e-2)
    collapsed = F.one_hot(torch.zeros(5, dtype=torch.long), 4).float()
    assert switch_load_balance_loss(collapsed).item() == pytest.approx(4.0)
    balanced = torch.eye(4)
    assert switch_load_balance_loss(balanced).item() == pytest.approx(1.0)


@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
def test_prompt_router_top_k_gates(gate_mode):
    torch.manual_seed(0)
    r = PromptRouter(16, 7, top_k=3, gate_mode=gate_mode)
    h = torch.randn(5, 6, 16)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1, :3] = False
    out = r(h, mask)
    assert out.gates.shape == (5, 7, 1)
    nz = (out.gates.squeeze(-1) != 0).sum(-1)
    assert torch.equal(nz, torch.full((5,), 3))
    assert torch.equal(out.selected, out.gates.squeeze(-1) != 0)
    if gate_mode == "soft":
        torch.testing.assert_close(out.gates.sum((1, 2)), torch.ones(5))
    else:
        assert set(out.gates.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(5))
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    # top-k picks the most probable modules
    top = out.probs.topk(3, -1).indices
    assert torch.equal(out.selected.gather(1, top), torch.ones(5, 3, dtype=torch.bool))
    # gradients reach weight, pooling query and the rational coefficients (soft: LM path; both: aux)
    (out.gates.squeeze(-1) * torch.arange(7.0)).sum().add(out.aux_loss).backward()
    own = r.trainable_parameters_of("0")  # a standalone router's slots are trainable, named by index
    assert set(own) == {"weight", "pool_query", "rational_num", "rational_den"}
    for p in own.values():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_prompt_router_module_mask_and_slots():
    torch.manual_seed(0)
    r = PromptRouter(16, 7, num_slots=0)
    r.add_slot(top_k=2, pooler="mean")
    r.add_slot(top_k=4, pooler="last", activation="gelu", gate_mode="hard", num_experts=2)
    assert r.num_experts == 2
    h = torch.randn(4, 5, 16)
    slots = torch.tensor([0, 1, 1, 0])
    mm = torch.ones(4, 7, dtype=torch.bool)
    mm[0, :3] = False
    out = r(h, slots=slots, module_mask=mm)
    g = out.gates
    assert torch.equal(g[0, :3], torch.zeros(3, 2))
    assert ((g[:, :, 0] != 0).sum(-1) == torch.tensor([2, 4, 4, 2])).all()
    assert (g[[0, 3], :, 1] == 0).all()  # slot 0 has one expert
    # batched per-slot routing equals routing each row alone
    for i in range(4):
        alone = r(h[i:i + 1], slots=slots[i:i + 1], module_mask=mm[i:i + 1]).gates
        torch.testing.assert_close(alone, g[i:i + 1])
    # E > 1, hard: a selected module's experts share its gate 1 by the within-module distribution
    torch.testing.assert_close(g[1].sum(-1)[g[1].sum(-1) != 0], torch.ones(4))
    r.remove_slot(1)
    assert r.num_slots == 1 and r.num_experts == 1 and r.weight.shape == (1, 7, 1, 16)
