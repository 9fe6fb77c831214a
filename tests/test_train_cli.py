"""`milora-train` end to end on a tiny random Llama and a tokenizer built in-process (no downloads):
prompt/response training data, a chat-format held-out file, adapter-only output that loads back."""
import json
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("tokenizers")

LETTERS = [chr(ord("a") + i) for i in range(8)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["reverse", "copy", ":", "=", "user", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def _save_tiny(dirpath):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + LETTERS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dirpath)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(dirpath)


def _rows(n, seed, chat=False):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = [rng.choice(LETTERS) for _ in range(rng.randint(2, 5))]
        task = rng.choice(["reverse", "copy"])
        y = list(reversed(x)) if task == "reverse" else x
        prompt, resp = f"{task} : {' '.join(x)} =", " ".join(y)
        if chat:
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]})
        else:
            out.append({"prompt": prompt, "response": resp})
    return out


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("method", ["milora", "lora"])
def test_milora_train_end_to_end(tmp_path, method, capsys):
    from milora.train_cli import main
    model_dir = tmp_path / "model"
    _save_tiny(model_dir)
    _write(tmp_path / "train.jsonl", _rows(48, 0))
    _write(tmp_path / "eval.jsonl", _rows(8, 1, chat=True))
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
               "--output", str(out), "--method", method, "--rank", "4", "--max-steps", "6", "--batch-size", "8",
               "--lr", "1e-2", "--save-steps", "3", "--logging-steps", "3", "--no-progress"]
              + (["--gradient-checkpointing"] if method == "milora" else []))
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 6
    assert summary.get("router_freeze_at") == (0.5 if method == "milora" else None)  # milora's default
    assert summary["trainable_params"] > 0
    assert 0.0 <= summary["exact_match"] <= 1.0 and summary["eval_examples"] == 8
    assert torch.isfinite(torch.tensor([summary["train_loss"], summary["eval_loss"]])).all()
    assert "milora-train summary" in capsys.readouterr().out
    # adapter-only checkpoints: safetensors + JSON, no full model, no pickles
    for d in (out, out / "checkpoint-3", out / "checkpoint-6"):
        files = set(os.listdir(d))
        assert "adapter_model.safetensors" in files, (d, files)
        assert "model.safetensors" not in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files
    if method == "milora":  # the default freeze at half the steps: routers fixed from step 3, LoRA still training
        from safetensors.torch import load_file
        mid, end = (load_file(str(out / c / "adapter_model.safetensors")) for c in ("checkpoint-3", "checkpoint-6"))
        routers = [k for k in mid if ".router." in k]
        assert routers and all(torch.equal(mid[k], end[k]) for k in routers)
        assert any(not torch.equal(mid[k], end[k]) for k in mid if k.endswith("lora_B"))
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "milora":
        from milora import MiLoRAModel
        m = MiLoRAModel.from_pretrained(base, str(out), adapter_name="t")
        assert m.adapters["t"].config.routing == "prompt"
        assert m.num_adapter_parameters("t") == summary["trainable_params"]
    else:
        from milora import MiLoRAModel
        m = MiLoRAModel.from_peft(base, str(out), adapter_name="t")
        assert m.adapters["t"].kind == "static"
    # the trained adapter is not the base model
    ids = torch.tensor([[1, 10, 8, 14, 15, 9]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
        got = m(input_ids=ids, adapter_names=["t"]).logits
    assert (got - ref).abs().max() > 1e-4


def test_milora_train_rejects_bad_rows(tmp_path):
    from milora.train_cli import main
    model_dir = tmp_path / "model"
    _save_tiny(model_dir)
    _write(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="expected fields 'prompt' and 'response', or 'messages'"):
        main(["--model", str(model_dir), "--train", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "o")])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_milora_train_rejects_a_router_freeze_outside_0_1(value, tmp_path, capsys):
    from milora.train_cli import main
    with pytest.raises(SystemExit) as e:  # argparse: before any file is read or written
        main(["--model", str(tmp_path / "m"), "--train", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "o"),
              "--router-freeze-at", value])
    assert e.value.code == 2
    assert "expected a fraction in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
