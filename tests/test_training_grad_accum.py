"""Gradient accumulation: the micro-batches of one step, given transformers' num_items_in_batch
(target tokens of the whole accumulated batch), add up to the gradient of one big batch: for a
single adapter (transformers' rule: summed token losses / num_items_in_batch) and for several
adapters trained at once (each adapter normalised by its own count, AdapterItemCounts, which
MiLoRATrainer computes). The load-balancing loss is not additive over micro-batches (Switch
loss of a union != mean of the parts), so the exact comparisons use load_balance_coef=0; its
weighting under num_items_in_batch is checked separately."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from milora import MiLoRAConfig, get_milora_model  # noqa: E402
from milora.training import AdapterItemCounts, MiLoRADataCollator, MiLoRATrainer, count_targets_per_adapter  # noqa: E402
from milora_test_utils import randomize_adapter, tiny_model  # noqa: E402

NAMES = ["a", "b", "a", "frozen", "b", "a"]


def _model(coef=0.0, several=True):
    cfg_a = MiLoRAConfig(r=4, alpha=8, top_k=3, load_balance_coef=coef)
    cfg_b = MiLoRAConfig(r=4, alpha=8, routing="token", experts_per_module=2, top_k=1, load_balance_coef=coef)
    model = get_milora_model(tiny_model(seed=0), cfg_a, adapter_name="a")
    model.add_adapter("b", cfg_b)
    model.add_adapter("frozen", MiLoRAConfig(r=2, alpha=4))
    for i, n in enumerate(("a", "b", "frozen")):
        randomize_adapter(model, n, 30 + i)
    if several:
        model.set_trainable_adapters(["a", "b"])
    else:
        model.set_adapter("a")
    model.train()
    return model


def _batch(seed=0, B=6, L=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, L), generator=g)
    labels = ids.clone()
    for r in range(B):  # prompts of different lengths: rows and micro-batches hold different target counts
        labels[r, : 2 + (3 * r) % 6] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same(a, b):
    assert set(a) == set(b) and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def _accumulate(model, ids, labels, names, parts, num_items):
    model.zero_grad()
    for rows in parts:
        kw = {"adapter_names": [names[r] for r in rows]} if names else {}
        model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items, **kw).loss.backward()
    return _grads(model)


PARTS = [[0, 2, 3], [1, 4, 5]]  # the first holds one trained adapter's rows and a frozen one's


def test_single_adapter_two_micro_batches_equal_one_batch():
    model = _model(several=False)
    ids, labels = _batch()
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()  # one batch: mean over its target tokens
    big = _grads(model)
    n = (labels[:, 1:] != -100).sum()
    _assert_same(_accumulate(model, ids, labels, None, PARTS, n), big)


def test_several_adapters_two_micro_batches_equal_one_batch_per_adapter_counts():
    model = _model()
    ids, labels = _batch()
    model.zero_grad()
    model(input_ids=ids, labels=labels, adapter_names=NAMES).loss.backward()  # each adapter's own mean
    big = _grads(model)
    batches = [{"labels": labels[p], "adapter_names": [NAMES[r] for r in p]} for p in PARTS]
    counts = count_targets_per_adapter(batches, ["a", "b"], default=None)
    per_row = (labels[:, 1:] != -100).sum(-1)
    assert counts.tolist() == [float(per_row[[0, 2, 5]].sum()), float(per_row[[1, 4]].sum())]
    assert per_row[[0, 2]].sum() != counts[0] and per_row[3] > 0
    items = AdapterItemCounts(per_row.sum(), {"a": counts[0], "b": counts[1]})
    _assert_same(_accumulate(model, ids, labels, NAMES, PARTS, items), big)
    # and the per-micro-batch means (num_items_in_batch ignored) would not: the test can fail
    wrong = _accumulate(model, ids, labels, NAMES, PARTS, None)
    assert any(not torch.allclose(wrong[n], big[n], rtol=1e-3) for n in big)


def test_several_adapters_with_one_shared_count():
    """A plain Trainer passes one number N: adapter a's gradient is (N_a / N) times its own."""
    model = _model()
    ids, labels = _batch()
    model.zero_grad()
    model(input_ids=ids, labels=labels, adapter_names=NAMES).loss.backward()
    own = _grads(model)
    n = (labels[:, 1:] != -100).sum()
    got = _accumulate(model, ids, labels, NAMES, PARTS, n)
    per_row = (labels[:, 1:] != -100).sum(-1).float()
    share = {"a": per_row[[0, 2, 5]].sum() / n, "b": per_row[[1, 4]].sum() / n}
    assert set(got) == set(own)
    for name, g in got.items():
        torch.testing.assert_close(g, own[name] * share[name.rsplit("__", 1)[1]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("several", [False, True])
def test_load_balancing_term_weighted_by_the_batch_share(several):
    model = _model(coef=0.5, several=several)
    ids, labels = _batch(1)
    kw = {"adapter_names": NAMES} if several else {}
    with torch.no_grad():
        plain = model(input_ids=ids, labels=labels, **kw)
        per_row = (labels[:, 1:] != -100).sum(-1)
        if several:
            whole = AdapterItemCounts(per_row.sum(), {"a": per_row[[0, 2, 5]].sum(), "b": per_row[[1, 4]].sum()})
            double = AdapterItemCounts(2 * per_row.sum(), {k: 2 * v for k, v in whole.per_adapter.items()})
        else:
            whole, double = per_row.sum(), 2 * per_row.sum()
        # the batch is the whole accumulated batch: the same loss as without the count
        one = model(input_ids=ids, labels=labels, num_items_in_batch=whole, **kw)
        # half of an accumulated batch: LM and load-balancing terms both halved
        half = model(input_ids=ids, labels=labels, num_items_in_batch=double, **kw)
    assert float(plain.aux_loss) > 0
    torch.testing.assert_close(one.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.loss, plain.loss / 2, rtol=1e-5, atol=1e-6)


def _trainer_grads(tmp_path, several, batch_size, accumulation):
    model = _model(several=several)
    ids, labels = _batch(2, B=4)
    data = [{"input_ids": ids[r].tolist(), "labels": labels[r].tolist(),
             **({"adapter_names": ["a", "b", "frozen", "b"][r]} if several else {})} for r in range(4)]
    seen = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.update(_grads(model))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, max_grad_norm=0.0, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0)
    MiLoRATrainer(model=model, args=args, train_dataset=data, data_collator=MiLoRADataCollator(),
                  callbacks=[Grab()]).train()
    return seen


@pytest.mark.parametrize("several", [False, True])
def test_trainer_gradient_accumulation_equals_one_batch(tmp_path, several):
    big = _trainer_grads(tmp_path / "big", several, batch_size=4, accumulation=1)
    accumulated = _trainer_grads(tmp_path / "acc", several, batch_size=2, accumulation=2)
    _assert_same(accumulated, big)
