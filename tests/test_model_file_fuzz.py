"""Fuzz-style sweep over many malformed adapter directories (MiLoRA format and PEFT format).

Each one must either be refused with a ValueError / TypeError / FileNotFoundError whose message is
ours (names the file / field, no raw library error), with the model bit-identical afterwards (and
from_pretrained / from_peft refuse it too, leaving a fresh base model unwrapped and bit-identical),
or load exactly what the files say. No pickle is ever loaded. Deterministic (fixed seeds)."""
import json
import math
import os
import pickle
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from milora import MiLoRAConfig, MiLoRAModel
from milora_test_utils import assert_state_equal, milora_model, snapshot_state, tiny_model
from adversarial_files import write_peft_dir

REFUSALS = (ValueError, TypeError, FileNotFoundError)
DELETE = object()
NESTED = [[[[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]]
VALUES = [DELETE, None, True, False, "x", "", "no", -1, 0, 1, 4.9, 2 ** 63, 10 ** 30, float("nan"), float("inf"), -1e300,
          [], {}, ["q_proj"], {"a": 1}, "a" * 3000, NESTED]
CONFIG_FIELDS = ["r", "alpha", "dropout", "target_modules", "top_k", "pooler", "activation", "gate_mode",
                 "experts_per_module", "routing", "load_balance_coef", "use_rslora"]
PEFT_FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "fan_in_fan_out",
               "rank_pattern", "alpha_pattern", "modules_to_save"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src, _ = milora_model(seed=2)
    src.save_pretrained(root / "good")
    write_peft_dir(root / "peft", ranks={(1, "q_proj"): 2}, rank_pattern={r"layers\.1\..*q_proj": 2},
                   alpha_pattern={"v_proj": 6})
    model, _ = milora_model(seed=3, adapter_name="keep")
    return root, model


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle / torch.load must never be used to read adapter files")
    for obj, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(obj, name, refuse)


def _set(doc, path, value):
    *parents, last = path
    for p in parents:
        doc = doc[p]
    if value is DELETE:
        doc.pop(last, None)
    else:
        doc[last] = value


class Judge:
    """Runs one load attempt and checks the outcome."""

    def __init__(self, model, wrap=None):
        self.model = model
        self.snap = snapshot_state(model)
        self.refused = self.loaded = 0
        self.wrap = wrap  # wrap(base): MiLoRAModel.from_pretrained / from_peft of the same directory
        self.base = tiny_model(seed=3)
        self.base_snap = snapshot_state(self.base)

    def __call__(self, label, load, verify):
        try:
            load()
        except REFUSALS as e:
            msg = str(e)
            assert "MiLoRA" in msg or "save_pretrained" in msg, f"{label}: not our message: {type(e).__name__}: {msg[:300]}"
            assert self.model.adapter_names == ["keep"], label
            assert_state_equal(self.model, self.snap)
            self.refused += 1
            if self.wrap is not None:  # wrapping a fresh base model with it is refused too, the base untouched
                with pytest.raises(REFUSALS):
                    self.wrap(self.base)
                assert_state_equal(self.base, self.base_snap)
                assert type(self.base.model.layers[0].self_attn.q_proj) is torch.nn.Linear, label
            return
        except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
            raise AssertionError(f"{label}: unexpected {type(e).__name__}: {str(e)[:300]}") from e
        try:
            verify()
        finally:
            self.model.delete_adapter("fz")
        assert_state_equal(self.model, self.snap)
        self.loaded += 1


def _verify_milora(model, d):
    doc = json.loads((d / "milora_config.json").read_text())
    info = model.adapters["fz"]
    assert info.config == MiLoRAConfig.from_dict(doc["config"]) and info.kind == doc["adapter_kind"]
    assert {f"layers.{i}.{m}": (r, s) for (i, m), (r, s) in info.modules.items()} == \
        {k: (v["rank"], float(v["scaling"])) for k, v in doc["modules"].items()}
    want = load_file(d / "adapter_model.safetensors")
    got = model.adapter_spec("fz").tensors
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k


def _reference_peft(cfg, names):
    import regex  # not re: "(.|.)*!" would backtrack for minutes (test_model_file_errors checks re semantics)

    def first(patterns, name, default):
        for k, v in (patterns or {}).items():
            if regex.match(rf"(.*\.)?({k})$", name, timeout=10):
                return v
        return default
    out = {}
    for i, m, parent in names:
        key = f"model.layers.{i}.{parent}.{m}"
        r, a = first(cfg.get("rank_pattern"), key, cfg["r"]), first(cfg.get("alpha_pattern"), key, cfg["lora_alpha"])
        out[(i, m)] = (r, a / (math.sqrt(r) if cfg.get("use_rslora") else r))
    return out


def _verify_peft(model, d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    t = load_file(d / "adapter_model.safetensors")
    names = {(int(k.split(".")[4]), k.split(".")[6], k.split(".")[5]) for k in t}
    info = model.adapters["fz"]
    assert info.kind == "static"
    want = _reference_peft(cfg, sorted(names))
    assert set(info.modules) == set(want)
    for key, (r, s) in want.items():
        assert info.modules[key][0] == r and info.modules[key][1] == pytest.approx(s, rel=1e-12), key
    got = model.adapter_spec("fz").tensors
    for i, m, parent in names:
        a = t[f"base_model.model.model.layers.{i}.{parent}.{m}.lora_A.weight"]
        assert torch.equal(got[f"layers.{i}.{m}.lora_A"][0], a)


def _json_cases(doc):
    paths = [(k,) for k in ["format", "format_version", "adapter_kind", "config", "base_model", "modules", "weights_digest"]]
    paths += [("config", f) for f in CONFIG_FIELDS]
    paths += [("base_model", f) for f in ["model_type", "hidden_size", "num_hidden_layers"]]
    paths += [("modules", "layers.0.q_proj"), ("modules", "layers.1.down_proj", "rank"), ("modules", "layers.0.v_proj", "scaling")]
    for path in paths:
        for v in VALUES:
            yield f"json {'.'.join(path)}={str(v)[:20] if v is not DELETE else 'DELETE'}", path, v


def _tensor_cases(t):
    k = "layers.0.q_proj.lora_A"
    yield "drop", lambda t: t.pop(k)
    yield "drop router", lambda t: t.pop("layers.1.router.rational_den")
    for dt in [torch.int32, torch.bool, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.float8_e4m3fn]:
        yield f"dtype {dt}", lambda t, dt=dt: t.__setitem__(k, t[k].to(dt))
    for name, fn in [("unsqueeze", lambda x: x.unsqueeze(0)), ("flatten", lambda x: x.flatten()),
                     ("transpose", lambda x: x.transpose(1, 2).contiguous()), ("empty", lambda x: x[:, :0]),
                     ("scalar", lambda x: x[0, 0, 0].clone())]:
        yield f"shape {name}", lambda t, fn=fn: t.__setitem__(k, fn(t[k]))
    for v in [float("nan"), float("inf"), -float("inf"), 3e38]:
        yield f"value {v}", lambda t, v=v: t[k].view(-1).__setitem__(5, v)
    for extra in ["layers.0.q_proj.lora_C", "layers.2.q_proj.lora_A", "layers.00.q_proj.lora_A", "x" * 300, "../x"]:
        yield f"extra {extra[:20]}", lambda t, extra=extra: t.__setitem__(extra, torch.zeros(1, 4, 64))


def test_fuzz_milora_directories(world, tmp_path, no_pickle):
    root, model = world
    d = tmp_path / "d"
    judge = Judge(model, wrap=lambda base: MiLoRAModel.from_pretrained(base, d))
    good_doc = json.loads((root / "good" / "milora_config.json").read_text())
    good_w = (root / "good" / "adapter_model.safetensors").read_bytes()
    shutil.copytree(root / "good", d)
    cfg, w = d / "milora_config.json", d / "adapter_model.safetensors"
    load = lambda: model.load_adapter(d, "fz")  # noqa: E731
    verify = lambda: _verify_milora(model, d)  # noqa: E731

    for label, path, v in _json_cases(good_doc):  # one field at a time
        doc = json.loads(json.dumps(good_doc))
        _set(doc, path, v)
        cfg.write_text(json.dumps(doc))
        judge(label, load, verify)
    cfg.write_text(json.dumps(good_doc))

    good_t = load_file(root / "good" / "adapter_model.safetensors")
    for label, edit in _tensor_cases(good_t):  # tensors, without the digest metadata (a hand-edited file)
        t = {k: v.clone() for k, v in good_t.items()}
        edit(t)
        save_file(t, w)
        judge(f"tensors {label}", load, verify)
    meta_other = {"format": "pt", "milora_weights_digest": "0" * 64}
    save_file(good_t, w, metadata=meta_other)
    judge("tensors digest of another save", load, verify)

    rng = random.Random(0)
    header = int.from_bytes(good_w[:8], "little") + 8
    cuts = [0, 1, 7, 8, 9, 50, header - 1, header, len(good_w) // 2, len(good_w) - 1]
    for n in cuts:
        w.write_bytes(good_w[:n])
        judge(f"weights cut at {n}", load, verify)
    for i in range(40):  # random byte flips, half in the JSON header
        data = bytearray(good_w)
        pos = rng.randrange(header) if i % 2 == 0 else rng.randrange(len(good_w))
        data[pos] = rng.randrange(256)
        w.write_bytes(bytes(data))
        judge(f"weights byte {pos}", load, verify)
    w.write_bytes((2 ** 63).to_bytes(8, "little") + good_w[8:])
    judge("weights huge header length", load, verify)
    w.write_bytes(good_w)

    text = cfg.read_text()
    for i in range(60):  # random edits of the JSON text
        pos = rng.randrange(len(text))
        junk = rng.choice(['"', "{", "}", "[", "]", ",", ":", "0", "-", "e9", "\\", "\x00", "ü", "NaN", "true", ""])
        cfg.write_text(text[:pos] + junk + text[pos + rng.randrange(3):], encoding="utf-8")
        judge(f"json text {pos} {junk!r}", load, verify)
    for label, write in [("empty", lambda: cfg.write_text("")), ("array", lambda: cfg.write_text("[]")),
                         ("latin1", lambda: cfg.write_bytes(b'{"format": "\xff"}')),
                         ("deep", lambda: cfg.write_text("[" * 100000 + "]" * 100000)),
                         ("dup", lambda: cfg.write_text(text.replace('"format": "milora"', '"format": "milora", "format": "x"')))]:
        write()
        judge(f"json {label}", load, verify)
    cfg.write_text(text)

    for label, make in [("weights dir", lambda: (os.remove(w), os.mkdir(w))),
                        ("weights /dev/zero", lambda: (os.rmdir(w), os.symlink("/dev/zero", w))),
                        ("weights fifo", lambda: (os.remove(w), os.mkfifo(w))),
                        ("weights dangling", lambda: (os.remove(w), os.symlink(d / "nowhere", w))),
                        ("weights missing", lambda: os.remove(w)),
                        ("config dir", lambda: (os.remove(cfg), os.mkdir(cfg))),
                        ("config missing", lambda: os.rmdir(cfg))]:
        make()
        judge(f"file {label}", load, verify)
    assert judge.refused > 500 and judge.loaded > 20, (judge.refused, judge.loaded)


def test_fuzz_peft_directories(world, tmp_path, no_pickle):
    root, model = world
    d = tmp_path / "p"
    judge = Judge(model, wrap=lambda base: MiLoRAModel.from_peft(base, d))
    good_cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    shutil.copytree(root / "peft", d)
    cfg, w = d / "adapter_config.json", d / "adapter_model.safetensors"
    load = lambda: model.load_peft_adapter(d, "fz")  # noqa: E731
    verify = lambda: _verify_peft(model, d)  # noqa: E731
    values = VALUES + [{"q_proj": 4}, {"v_proj": 2}, {"(": 4}, {"(.|.)*!": 3}, {"q_proj": None}, {"v_proj": -1}]
    for field in PEFT_FIELDS:
        for v in values:
            c = dict(good_cfg)
            _set(c, (field,), v)
            cfg.write_text(json.dumps(c))
            judge(f"peft {field}={str(v)[:20] if v is not DELETE else 'DELETE'}", load, verify)
    cfg.write_text(json.dumps(good_cfg))
    good_t = load_file(w)
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edits = [("drop A", lambda t: t.pop(a)), ("rank 0", lambda t: t.__setitem__(a, t[a][:0])),
             ("3-d", lambda t: t.__setitem__(a, t[a].unsqueeze(0))), ("int", lambda t: t.__setitem__(a, t[a].to(torch.int8))),
             ("nan", lambda t: t[a].view(-1).__setitem__(0, float("nan"))),
             ("lm_head", lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))),
             ("layers.00", lambda t: t.__setitem__(a.replace("layers.0.", "layers.00."), t[a].clone())),
             ("named adapter twice", lambda t: t.__setitem__(a.replace("lora_A.weight", "lora_A.default.weight"), t[a].clone())),
             ("no tensors", lambda t: t.clear()),
             ("layer 5", lambda t: [t.__setitem__(k.replace("layers.0.", "layers.5."), t.pop(k)) for k in list(t) if "layers.0." in k])]
    for label, edit in edits:
        t = {k: v.clone() for k, v in good_t.items()}
        edit(t)
        save_file(t, w)
        judge(f"peft tensors {label}", load, verify)
    assert judge.refused > 150 and judge.loaded > 15, (judge.refused, judge.loaded)
