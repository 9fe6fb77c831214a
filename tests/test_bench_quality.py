"""`milora-bench quality`: the task suite is deterministic, and every method trains 20 steps and
is evaluated in one mixed batch (micro base model, pre-trained in seconds into a temp cache)."""
import json

import pytest
import torch

pytest.importorskip("peft")

from milora.bench import quality_tasks as qt


def test_suite_is_deterministic_and_held_out_is_disjoint():
    a = qt.held_out(qt.MIXED_TASKS, 16)
    b = qt.held_out(qt.MIXED_TASKS, 16)
    assert a == b and len(a) == 16 * len(qt.MIXED_TASKS)
    s1, s2 = qt.TrainStream(qt.MIXED_TASKS, 3, exclude=a), qt.TrainStream(qt.MIXED_TASKS, 3, exclude=a)
    batches = [s1.batch(32) for _ in range(5)]
    assert batches == [s2.batch(32) for _ in range(5)]
    assert batches != [qt.TrainStream(qt.MIXED_TASKS, 4, exclude=a).batch(32) for _ in range(5)]
    held = {(e.task, e.prompt) for e in a}
    assert not any((e.task, e.prompt) in held for bt in batches for e in bt)
    # task rules on a known input
    x = [3, 1, 2, 15]
    assert qt.RULES["rev_shift"](x) == [1, 4, 3, 5]
    assert qt.RULES["sort_desc"](x) == [15, 3, 2, 1]
    assert qt.RULES["every_other"](x) == [3, 2]
    assert qt.RULES["swap_pairs"](x) == [1, 3, 15, 2]


def test_interference_tasks_conflict_everywhere():
    """The interference mix maps the same input to a different output for every pair of tasks."""
    ex = qt.held_out(qt.INTERFERENCE_TASKS[:1], 8)
    for e in ex:
        syms = [t - qt.SYMBOL0 for t in e.prompt[2:-1]]
        outs = [tuple(qt.RULES[t](syms)) for t in qt.INTERFERENCE_TASKS]
        assert all(outs[i][j] != outs[k][j] for i in range(4) for k in range(i + 1, 4) for j in range(len(syms)))


def test_quality_smoke_every_method(tmp_path, capsys):
    from milora.bench.cli import main
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    torch.manual_seed(0)
    rc = main(["quality", "--model", "micro", "--cache-dir", str(tmp_path), "--mixes", "interference",
               "--steps", "20", "--eval-at", "10", "--eval-per-task", "4", "--rank", "4", "--batch", "8",
               "--json", str(out), "--plot", str(png), "--no-progress", "--threads", "1"])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert png.stat().st_size > 10_000  # accuracy bars, learning curves, routing heat map
    text = capsys.readouterr().out
    assert "trainable parameters" in text and "| perm_a |" in text
    assert {r["method"] for r in recs} == {"lora", "static", "moelora", "milora"}
    assert {r["steps"] for r in recs} == {10, 20}
    final = [r for r in recs if r["steps"] == 20]
    for r in final:
        for k in ("method", "task", "accuracy", "trainable_params", "seed", "steps", "tokens", "held_out_loss"):
            assert k in r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["held_out_loss"] > 0 and r["trainable_params"] > 0
    mil = [r for r in final if r["method"] == "milora"]
    for r in mil:
        for layer in ("layer0", "layer1"):
            st = r["routing"][layer]
            assert abs(sum(st["share"].values()) - 3.0) < 1e-3  # top-3 of 7 per prompt
            assert 0.0 <= st["entropy_bits"] <= 2.81 and st["load_balance"] >= 0.99
    loss = {r["method"]: r["held_out_loss"] for r in final if r["task"] == "mean"}
    # lora (PEFT) and static (milora's router-less path) start from the same init and see the same
    # batches: they must train alike (fp32 differences only)
    assert abs(loss["lora"] - loss["static"]) < 1e-3 * loss["lora"]
    # the PEFT adapter served inside the mixed milora batch answers like PEFT's own generate
    for r in final:
        if r["method"] == "lora":
            assert r["accuracy"] == r["accuracy_peft_generate"]
    # the cached base model is reused: a second run does not pre-train again
    assert len(list(tmp_path.glob("quality_base_micro_*.safetensors"))) == 1


def test_milora_lr_scales_change_only_their_groups(tmp_path):
    """Recipe.router_lr_scale / milora_lr_scale multiply the learning rate of milora's routers /
    LoRA weights: scale 0 freezes that group while the other trains; other methods ignore them."""
    from milora.bench.quality_methods import MethodTrainer, Recipe, choose_ranks
    from milora.bench.quality_model import load_base
    from milora.bench.quality_tasks import MIXES, TrainStream

    base, _, _ = load_base("micro", str(tmp_path), log=lambda *a: None)
    stream = TrainStream(MIXES["mixed"], 0)
    batches = [stream.batch(8) for _ in range(5)]

    def trained(recipe, method="milora"):
        plans = choose_ranks(base, 4, recipe)
        tr = MethodTrainer(method, base, plans[method], recipe, 0, 5, str(tmp_path))
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        tr.train_to(5, batches)
        moved = {n: not torch.equal(before[n], p.detach()) for n, p in tr.model.named_parameters() if p.requires_grad}
        return tr, moved

    tr, moved = trained(Recipe(lr=1e-2, batch=8, router_lr_scale=0.0, milora_lr_scale=2.0))
    routers = {n: v for n, v in moved.items() if n.startswith("routers.")}
    lora = {n: v for n, v in moved.items() if not n.startswith("routers.")}
    assert routers and not any(routers.values())        # lr 0: the routers stay at their init
    assert any(v for n, v in lora.items() if "lora_b" in n)
    assert [g["lr_scale"] for g in tr.opt.param_groups] == [2.0, 0.0]
    last = tr.opt.param_groups
    assert last[0]["lr"] > 0 and last[1]["lr"] == 0.0
    _, moved = trained(Recipe(lr=1e-2, batch=8))
    assert any(v for n, v in moved.items() if n.startswith("routers."))  # default: the routers train
    tr, _ = trained(Recipe(lr=1e-2, batch=8, router_lr_scale=0.0, milora_lr_scale=0.0), method="moelora")
    assert [g["lr_scale"] for g in tr.opt.param_groups] == [1.0]


def test_router_freeze_stops_only_the_routers(tmp_path):
    """Recipe.router_freeze_at: after that fraction of the steps milora's routers get learning
    rate 0 (their weights stop moving) while its LoRA weights keep training."""
    from milora.bench.quality_methods import MethodTrainer, Recipe, choose_ranks
    from milora.bench.quality_model import load_base
    from milora.bench.quality_tasks import MIXES, TrainStream

    base, _, _ = load_base("micro", str(tmp_path), log=lambda *a: None)
    stream = TrainStream(MIXES["mixed"], 0)
    batches = [stream.batch(8) for _ in range(6)]
    recipe = Recipe(lr=1e-2, batch=8, router_freeze_at=0.5)
    tr = MethodTrainer("milora", base, choose_ranks(base, 4, recipe)["milora"], recipe, 0, 6, str(tmp_path))
    snapshot = lambda: {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}  # noqa: E731
    start = snapshot()
    tr.train_to(3, batches)  # steps 0-2: before the freeze, everything trains
    mid = snapshot()
    assert any(not torch.equal(start[n], mid[n]) for n in mid if n.startswith("routers."))
    tr.train_to(6, batches)  # steps 3-5: routers frozen
    end = snapshot()
    assert all(torch.equal(mid[n], end[n]) for n in end if n.startswith("routers."))
    assert any(not torch.equal(mid[n], end[n]) for n in end if "lora_b" in n)
    assert [g["lr"] for g in tr.opt.param_groups if g.get("router")] == [0.0]
