"""Behaviour 4: training reduces the loss, reaches LoRA and router parameters, keeps the base frozen."""
import pytest
import torch

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import OpSpy, forward_gates, generate_with_gates, milora_model, randomize_adapter, tiny_model


def _batch(seed=0, B=4, L=10, prompt_len=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[:, :prompt_len] = 1
    return ids, labels, prompt_mask


@pytest.mark.parametrize("activation", ["rational", "gelu"])
def test_a_few_steps_reduce_the_loss(activation):
    cfg = MiLoRAConfig(r=4, alpha=8, top_k=3, activation=activation, load_balance_coef=0.1)
    model, _ = milora_model(seed=0, config=cfg, randomize=False)
    model.add_adapter("other", MiLoRAConfig(r=4, alpha=8))
    randomize_adapter(model, "other", 3)
    model.set_adapter("default")
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    ids, labels, pm = _batch()
    other_before = model(input_ids=ids, adapter_names=["other"] * 4).logits.detach()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay cannot reach "other": it has no Parameters
    losses, grads = [], {}
    for step in range(8):
        out = model(input_ids=ids, labels=labels, prompt_mask=pm)
        assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
        opt.zero_grad()
        out.loss.backward()
        if step == 2:  # after B has left zero, every parameter group has a gradient
            lin = model.milora_linears()[(1, "v_proj")].trainable_parameters_of("default")
            r = model.routers[1].trainable_parameters_of("default")
            grads = {"lora_a": lin["lora_a"].grad, "lora_b": lin["lora_b"].grad, "router": r["weight"].grad,
                     "pool_query": r["pool_query"].grad}
            if activation == "rational":
                grads["rational_num"] = r["rational_num"].grad
                grads["rational_den"] = r["rational_den"].grad
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for k, g in grads.items():
        assert g is not None and g.abs().sum() > 0, k          # "default" is trained
    assert not model.milora_linears()[(1, "v_proj")].trainable_parameters_of("other")  # "other" has no Parameters
    # base weights unchanged, other adapter unchanged
    for n, p in model.base_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
            assert not p.requires_grad, n
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, adapter_names=["other"] * 4).logits, other_before)


def test_loss_is_lm_loss_plus_coef_times_aux():
    cfg = MiLoRAConfig(r=4, alpha=8, load_balance_coef=0.25)
    model, _ = milora_model(seed=1, config=cfg)
    ids, labels, pm = _batch(1)
    out = model(input_ids=ids, labels=labels, prompt_mask=pm)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, lm + 0.25 * out.aux_loss)
    assert 0 < out.aux_loss.item() <= 7


def test_training_routes_like_inference_on_the_prompt():
    """Pooling over prompt tokens only: the gates of a training forward (prompt + response with
    prompt_mask) equal the gates generate computes from the prompt alone."""
    model, _ = milora_model(seed=2)
    ids, labels, pm = _batch(2)
    train_gates = forward_gates(model, input_ids=ids, labels=labels, prompt_mask=pm)
    _, gen_gates = generate_with_gates(model, input_ids=ids[:, :6], max_new_tokens=1, do_sample=False)
    for lt, lg in zip(train_gates, gen_gates):
        for a, b in zip(lt, lg):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainable_parameters_and_print(capsys):
    model, _ = milora_model(seed=0)
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    n = model.num_adapter_parameters()
    # 2 layers: LoRA r=4 on 4 attention (64->64, 64->32 x2, 64->64) and 3 MLP linears, plus routers
    lora = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64)) * 2
    router = (7 * 64 + 64 + 12) * 2
    assert n == lora + router
    assert f"trainable params: {n:,d}" in text
    # exactly the active adapter's own Parameters require grad, and they are what is counted
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n
    assert all(".trainable." in n_ for n_, p in model.named_parameters() if p.requires_grad)


def test_bfloat16_model():
    base = tiny_model(seed=0, dtype=torch.bfloat16)
    model = get_milora_model(base, MiLoRAConfig(r=4, alpha=8))
    randomize_adapter(model, "default", 1)
    lin = model.milora_linears()[(0, "q_proj")]
    assert lin.lora_a.dtype == torch.bfloat16 and model.routers[0].weight.dtype == torch.float32
    own = lin.trainable_parameters_of("default")
    assert own["lora_a"].dtype == torch.float32  # trainable adapters on a 16-bit base: float32 master weights
    ids, labels, pm = _batch(3)
    model.train()
    out = model(input_ids=ids, labels=labels, prompt_mask=pm)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert own["lora_b"].grad.dtype == torch.float32 and own["lora_b"].grad.abs().sum() > 0
    model.eval()
    gen, gates = generate_with_gates(model, input_ids=ids[:2, :6], adapter_names=["default", "base"], max_new_tokens=3,
                                     do_sample=False)
    assert gen.shape == (2, 9)
    assert gates[0][0].dtype == torch.float32


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models(family):
    model, ref = milora_model(family, seed=4)
    ids, labels, pm = _batch(4, B=2)
    out = model(input_ids=ids, adapter_names=["default", "base"], labels=labels)
    with torch.no_grad():
        base = ref(input_ids=ids).logits
    torch.testing.assert_close(out.logits[1], base[1], rtol=1e-5, atol=1e-5)
    assert (out.logits[0] - base[0]).abs().max() > 1e-3
    gen = model.generate(input_ids=ids[:, :5], adapter_names=["default", "base"], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[1], ref.generate(input_ids=ids[1:2, :5], max_new_tokens=3, do_sample=False)[0])


def test_dtype_move_after_wrapping_and_tuple_outputs():
    model, _ = milora_model(seed=5)
    ids, labels, pm = _batch(5, B=2)
    want = model(input_ids=ids, labels=labels, prompt_mask=pm)
    tup = model(input_ids=ids, labels=labels, prompt_mask=pm, return_dict=False)
    torch.testing.assert_close(tup[0], want.loss)
    torch.testing.assert_close(tup[-1], want.aux_loss)
    model.to(torch.bfloat16)
    assert model.milora_linears()[(0, "q_proj")].lora_a.dtype == torch.bfloat16
    out = model(input_ids=ids, labels=labels, prompt_mask=pm)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), want.logits, rtol=0.1, atol=0.1)
    assert model.generate(input_ids=ids[:, :5], max_new_tokens=2, do_sample=False).shape == (2, 7)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("routing", ["prompt", "token"])
def test_gradient_checkpointing_gives_equal_loss_and_grads(monkeypatch, reentrant, routing):
    cfg = MiLoRAConfig(r=4, alpha=8, routing=routing, experts_per_module=2 if routing == "token" else 1,
                       top_k=2, load_balance_coef=0.1)
    model, _ = milora_model(seed=7, config=cfg)
    ids, labels, pm = _batch(7)
    batch = dict(input_ids=ids, labels=labels, prompt_mask=pm)
    model.train()
    want = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})  # HF's, through the wrapper
    try:
        assert all(layer.gradient_checkpointing for layer in model.layers)
        spy = OpSpy(monkeypatch)
        if routing == "token" and reentrant:
            with pytest.raises(NotImplementedError, match="use_reentrant"):
                _loss_and_grads(model, batch)
            return
        got = _loss_and_grads(model, batch)
    finally:
        model.gradient_checkpointing_disable()
    n_lin = len(model.milora_linears())
    assert len(spy.calls) == 2 * n_lin  # the recomputation really ran each layer again
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert set(got[2]) == set(want[2])
    routers = [n for n in want[2] if "router" in n]
    assert routers and all(want[2][n].abs().sum() > 0 for n in routers)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_enabled_on_the_base_model_trains_the_same():
    """Checkpointing switched on through the wrapped HF model (as Trainer / user code may do)."""
    model, _ = milora_model(seed=8)
    ids, labels, pm = _batch(8, B=2)
    batch = dict(input_ids=ids, labels=labels, prompt_mask=pm)
    model.train()
    want = _loss_and_grads(model, batch)
    enable = getattr(model.base_model, "activation_checkpointing_enable", None) or model.base_model.gradient_checkpointing_enable
    enable({"use_reentrant": True})
    try:
        got = _loss_and_grads(model, batch)
    finally:
        disable = getattr(model.base_model, "activation_checkpointing_disable", None) or model.base_model.gradient_checkpointing_disable
        disable()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-5, atol=1e-7, msg=n)


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, _ = milora_model(seed=9)
    ids, labels, pm = _batch(9, B=4)
    data = [dict(input_ids=ids[i], labels=labels[i], prompt_mask=pm[i]) for i in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[],
        save_strategy="no", logging_steps=1, remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert all(layer.gradient_checkpointing for layer in model.layers)
    assert all(type(layer._gradient_checkpointing_func).__name__ == "RoutedCheckpoint" for layer in model.layers)
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert any("router" in n for n in moved) and any("lora_b" in n for n in moved)


@pytest.mark.parametrize("routing", ["prompt", "token"])
def test_to_bfloat16_keeps_routers_and_scaling_float32(tmp_path, routing):
    """model.to(torch.bfloat16) == the same adapter loaded onto a bfloat16 base (issue 10 point 7)."""
    import milora
    cfg = MiLoRAConfig(r=4, alpha=8, routing=routing, experts_per_module=2 if routing == "token" else 1, top_k=2)
    model, _ = milora_model(seed=11, config=cfg)
    model.save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16)
    for r in model.routers:
        assert all(p.dtype == torch.float32 for p in r.parameters())
    for lin in model.milora_linears().values():
        assert lin.scaling.dtype == torch.float32 and lin.lora_a.dtype == torch.bfloat16
        assert lin.weight.dtype == torch.bfloat16
        if routing == "token":
            assert lin.router_weight.dtype == torch.float32
    loaded = milora.MiLoRAModel.from_pretrained(tiny_model(seed=11, dtype=torch.bfloat16), tmp_path / "fp32")
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # re-saving writes the float32 routers unrounded
    model.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "fp32" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    for k in a:
        if "router" in k:
            assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
