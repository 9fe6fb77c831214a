"""HF Trainer with default arguments: labels reach forward, the prompt comes from labels == -100,
the collator pads every column, MiLoRATrainer checkpoints hold only the adapter and resume
bit-identically, bf16 mixed precision on CPU."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from milora import MiLoRAConfig, MiLoRAModel, get_milora_model  # noqa: E402
from milora.training import MiLoRADataCollator, MiLoRATrainer, prompt_mask_from_labels  # noqa: E402
from milora_test_utils import randomize_adapter, tiny_model  # noqa: E402


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L, P = 6 + i % 4, 2 + i % 3
        ids = torch.randint(1, 128, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * P + ids[P:]})
    return out


def _model(seed=0, dtype=torch.float32, **kw):
    model = get_milora_model(tiny_model(seed=seed, dtype=dtype), MiLoRAConfig(r=4, alpha=8, top_k=3), **kw)
    model.train()
    return model


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_plain_trainer_with_default_arguments_trains(tmp_path):
    model = _model()
    before = _trainable(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   data_collator=MiLoRADataCollator())
    result = trainer.train()  # "The model did not return a loss" before labels reached forward
    assert result.training_loss > 0
    after = _trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_prompt_defaults_to_the_labels_ignored_tokens():
    model = _model()
    randomize_adapter(model, "default", 3)
    model.eval()
    batch = MiLoRADataCollator()(_data(4))
    ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
    pm = prompt_mask_from_labels(labels, am)
    assert torch.equal(pm, ((labels == -100) & (am == 1)).long())
    with torch.no_grad():
        implicit = model(input_ids=ids, attention_mask=am, labels=labels)
        explicit = model(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=pm)
        other = model(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=am)
    assert torch.equal(implicit.logits, explicit.logits) and torch.equal(implicit.loss, explicit.loss)
    assert not torch.equal(other.logits, implicit.logits)  # an explicit prompt_mask wins
    # a row whose every token is a target pools over all its tokens
    full = torch.tensor([[5, 6, 7, 8]])
    assert prompt_mask_from_labels(full, None).tolist() == [[1, 1, 1, 1]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_every_column(side):
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_mask": [1, 0, 0], "adapter_names": "a"},
             {"input_ids": [4, 5], "labels": [-100, 5], "prompt_mask": [1, 0], "adapter_names": "b"}]
    b = MiLoRADataCollator(pad_token_id=9, padding_side=side, pad_to_multiple_of=4)(feats)
    assert b["adapter_names"] == ["a", "b"]
    row = {"right": [4, 5, 9, 9], "left": [9, 9, 4, 5]}[side]
    assert b["input_ids"][1].tolist() == row
    keep = [v != 9 for v in row]
    assert b["attention_mask"][1].tolist() == [int(k) for k in keep]
    assert b["labels"][1].tolist() == [v if k else -100 for v, k in zip({"right": [-100, 5, 0, 0], "left": [0, 0, -100, 5]}[side], keep)]
    assert b["prompt_mask"][1].tolist() == ({"right": [1, 0, 0, 0], "left": [0, 0, 1, 0]}[side])
    with pytest.raises(ValueError, match="labels"):
        MiLoRADataCollator()([{"input_ids": [1, 2], "labels": [1]}])


def test_milora_trainer_checkpoint_holds_only_the_adapter_and_loads(tmp_path):
    model = _model()
    trainer = MiLoRATrainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=2),
                            train_dataset=_data(), data_collator=MiLoRADataCollator())
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"milora_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    size = os.path.getsize(ckpt / "adapter_model.safetensors")
    assert size < 4 * 2 * model.num_adapter_parameters() + 20000  # adapter + router only (float32), no base
    loaded = MiLoRAModel.from_pretrained(tiny_model(seed=0), ckpt)
    ids = MiLoRADataCollator()(_data(3, seed=5))["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    straight = _model()
    MiLoRATrainer(model=straight, args=_args(tmp_path / "a", save_strategy="steps", save_steps=2),
                  train_dataset=_data(), data_collator=MiLoRADataCollator()).train()
    resumed = _model()
    t = MiLoRATrainer(model=resumed, args=_args(tmp_path / "a", save_strategy="no"),
                      train_dataset=_data(), data_collator=MiLoRADataCollator())
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_trainer_bf16_mixed_precision_on_cpu(tmp_path):
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=_data(),
                                   data_collator=MiLoRADataCollator())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # float32 masters (bf16 base: test_training_isolation)


def test_router_freeze_callback_stops_only_the_routers(tmp_path):
    from milora.training import RouterFreezeCallback
    model = _model()
    routers = lambda: {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("routers.") and p.requires_grad}  # noqa: E731
    lora = lambda: {n: p.detach().clone() for n, p in model.named_parameters() if "lora_b" in n and p.requires_grad}  # noqa: E731
    r0, l0 = routers(), lora()
    assert r0 and l0
    # 4 steps, frozen from step 2: train 2 steps, check, then 2 more
    args = _args(tmp_path, max_steps=4)
    trainer = MiLoRATrainer(model=model, args=args, train_dataset=_data(16), data_collator=MiLoRADataCollator(),
                            callbacks=[RouterFreezeCallback(0.5)])
    seen = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                seen["r"], seen["l"] = routers(), lora()

    trainer.add_callback(Snapshot())
    trainer.train()
    r2, l2 = seen["r"], seen["l"]
    r4, l4 = routers(), lora()
    assert any(not torch.equal(r0[n], r2[n]) for n in r0)      # steps 0-1: the routers train
    assert all(torch.equal(r2[n], r4[n]) for n in r2)          # steps 2-3: frozen
    assert any(not torch.equal(l2[n], l4[n]) for n in l2)      # while the LoRA weights keep training
    with pytest.raises(ValueError, match="fraction"):
        RouterFreezeCallback(1.5)
