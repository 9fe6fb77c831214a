"""Adversarial adapter files and configs (issue 10 points 2, 3, 6, 8, 10, 11): every bad input is a
ValueError / TypeError naming the field, the model stays bit-identical, saves are atomic."""
import errno
import json
import os
import re
import time

import pytest
import torch

import milora.files as files
import milora.peft_import as peft_import
from milora import MiLoRAConfig, MiLoRAModel
from milora_test_utils import assert_state_equal, milora_model, randomize_adapter, snapshot_state, tiny_model
from adversarial_files import copy_dir, edit_json, edit_tensors, peft_key, write_peft_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(seed=0):
    return torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    model, _ = milora_model(seed=2)
    model.save_pretrained(root / "good")
    write_peft_dir(root / "peft")
    return root


@pytest.fixture(scope="module")
def target():
    """Shared by the tests: each leaves it as it found it (refusals must not change it at all)."""
    model, _ = milora_model(seed=3, adapter_name="keep")
    return model


def _refused(model, load, exc, msg):
    """load() raises exc matching msg and leaves model bit-identical."""
    snap = snapshot_state(model)
    names = list(model.adapter_names)
    ids = _ids()
    before = model(input_ids=ids).logits
    with pytest.raises(exc, match=msg):
        load()
    assert model.adapter_names == names
    assert_state_equal(model, snap)
    assert torch.equal(model(input_ids=ids).logits, before)


# ---- config values (points 2, 6, 11) --------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(top_k=2 ** 63), r"top_k must be an integer in \[1, 7\]"),
    (dict(top_k=10 ** 30), "top_k"),
    (dict(top_k=15, experts_per_module=2), r"top_k must be an integer in \[1, 14\]"),
    (dict(top_k=True), "top_k"),
    (dict(r=4.9), "r must be an integer"),
    (dict(r=True), "r must be an integer"),
    (dict(r=2 ** 40), "r must be an integer"),
    (dict(experts_per_module=10 ** 30), "experts_per_module"),
    (dict(alpha=-8), "alpha must be a finite number > 0"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=10 ** 400), "alpha must be a finite number"),
    (dict(alpha=1e300), "too large"),
    (dict(alpha="8"), "alpha"),
    (dict(use_rslora="no"), "use_rslora must be true or false"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(dropout="x"), "dropout"),
    (dict(dropout=True), "dropout"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(load_balance_coef=10 ** 400), "load_balance_coef"),
    (dict(pooler=["mean"]), "pooler"),
    (dict(target_modules=[["q_proj"]]), "target_modules must hold module names"),
    (dict(target_modules=5), "target_modules must be a list"),
])
def test_config_refuses_out_of_range_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MiLoRAConfig(**kw)
    base = MiLoRAConfig(r=4).to_dict()
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        MiLoRAConfig.from_json_string(json.dumps(base))


def test_fields_assigned_later_are_checked_by_validate():
    cfg = MiLoRAConfig(r=4)
    cfg.top_k = 2 ** 63
    with pytest.raises(ValueError, match="top_k"):
        cfg.validate()


def test_config_strict_json():
    with pytest.raises(ValueError, match="duplicate key 'r'"):
        MiLoRAConfig.from_json_string('{"r": 4, "r": 5}')
    with pytest.raises(ValueError, match="nested too deeply|nested more than"):
        MiLoRAConfig.from_json_string('{"r": ' + "[" * 100000 + "]" * 100000 + "}")


@pytest.mark.parametrize("top_k", [2 ** 63, 10 ** 30])
def test_huge_top_k_in_a_file_is_refused_before_anything_changes(good, tmp_path, target, top_k):
    d = copy_dir(good / "good", tmp_path / "topk")
    edit_json(d / "milora_config.json", lambda doc: doc["config"].__setitem__("top_k", top_k))
    _refused(target, lambda: target.load_adapter(d, "new"), ValueError, "milora_config.json: bad config: .*top_k")
    target.load_adapter(good / "good", "after")  # later loads work
    target.to(torch.float32)(input_ids=_ids())   # and a forward after .to()
    target.delete_adapter("after")
    base = tiny_model(seed=4)
    snap = snapshot_state(base)
    with pytest.raises(ValueError, match="top_k"):
        MiLoRAModel.from_pretrained(base, d)
    assert_state_equal(base, snap)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # not wrapped


# ---- milora files (point 11) ----------------------------------------------------------------

def _milora_case(name, d):
    cfg, w = d / "milora_config.json", d / "adapter_model.safetensors"
    cases = {
        "layers_not_int": (lambda: edit_json(cfg, lambda doc: doc["base_model"].__setitem__("num_hidden_layers", "abc")),
                           ValueError, "base_model.num_hidden_layers must be a positive integer"),
        "layers_float": (lambda: edit_json(cfg, lambda doc: doc["base_model"].__setitem__("num_hidden_layers", 2.0)),
                         ValueError, "base_model.num_hidden_layers"),
        "hidden_bool": (lambda: edit_json(cfg, lambda doc: doc["base_model"].__setitem__("hidden_size", True)),
                        ValueError, "base_model.hidden_size"),
        "rank_float": (lambda: edit_json(cfg, lambda doc: doc["modules"]["layers.0.q_proj"].__setitem__("rank", 4.9)),
                       ValueError, r"modules.layers.0.q_proj.rank must be an integer"),
        "rank_zero": (lambda: edit_json(cfg, lambda doc: doc["modules"]["layers.0.q_proj"].__setitem__("rank", 0)),
                      ValueError, "rank must be an integer"),
        "scaling_negative": (lambda: edit_json(cfg, lambda doc: doc["modules"]["layers.0.q_proj"].__setitem__("scaling", -2.0)),
                             ValueError, "scaling must be a finite number > 0"),
        "alpha_negative": (lambda: edit_json(cfg, lambda doc: doc["config"].__setitem__("alpha", -8)),
                           ValueError, "alpha must be a finite number > 0"),
        "rslora_no": (lambda: edit_json(cfg, lambda doc: doc["config"].__setitem__("use_rslora", "no")),
                      ValueError, "use_rslora must be true or false"),
        "dropout_x": (lambda: edit_json(cfg, lambda doc: doc["config"].__setitem__("dropout", "x")),
                      ValueError, "dropout"),
        "leading_zero": (lambda: edit_json(cfg, lambda doc: doc["modules"].__setitem__("layers.00.q_proj", {"rank": 4, "scaling": 2.0})),
                         ValueError, "bad module key 'layers.00.q_proj'"),
        "version_true": (lambda: edit_json(cfg, lambda doc: doc.__setitem__("format_version", True)),
                         ValueError, "format_version"),
        "deep_json": (lambda: cfg.write_text('{"format": ' + "[" * 50000 + "]" * 50000 + "}"),
                      ValueError, "not valid JSON \\(nested too deeply\\)"),
        "nested_40": (lambda: cfg.write_text('{"format": ' + "[" * 40 + "]" * 40 + "}"),
                      ValueError, "nested more than 32"),
        "duplicate_key": (lambda: cfg.write_text(cfg.read_text().replace('"format": "milora"', '"format": "milora", "format": "milora"')),
                          ValueError, "duplicate key 'format'"),
        "huge_int": (lambda: cfg.write_text(cfg.read_text().replace('"format_version": 1', '"format_version": 1' + "0" * 5000)),
                     ValueError, "not valid JSON"),
        "weights_dir": (lambda: (os.remove(w), os.mkdir(w)), ValueError, "is a directory"),
        "weights_dev_zero": (lambda: (os.remove(w), os.symlink("/dev/zero", w)), ValueError, "not a regular file"),
        "config_dev_zero": (lambda: (os.remove(cfg), os.symlink("/dev/zero", cfg)), ValueError, "not a regular file"),
        "config_fifo": (lambda: (os.remove(cfg), os.mkfifo(cfg)), ValueError, "not a regular file"),
        "weights_int": (lambda: edit_tensors(w, lambda t: t.__setitem__("layers.0.q_proj.lora_A", t["layers.0.q_proj.lora_A"].to(torch.int32))),
                        ValueError, "layers.0.q_proj.lora_A must be a float16/bfloat16/float32/float64 tensor"),
        "weights_nan": (lambda: edit_tensors(w, lambda t: t["layers.1.v_proj.lora_B"].view(-1).__setitem__(3, float("nan"))),
                        ValueError, "layers.1.v_proj.lora_B holds NaN or Inf"),
        "weights_rank0": (lambda: edit_tensors(w, lambda t: t.__setitem__("layers.0.q_proj.lora_A", torch.zeros(1, 0, 64))),
                          ValueError, r"layers.0.q_proj.lora_A has shape \(1, 0, 64\)"),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["layers_not_int", "layers_float", "hidden_bool", "rank_float", "rank_zero", "scaling_negative",
                                  "alpha_negative", "rslora_no", "dropout_x", "leading_zero", "version_true", "deep_json",
                                  "nested_40", "duplicate_key", "huge_int", "weights_dir", "weights_dev_zero",
                                  "config_dev_zero", "config_fifo", "weights_int", "weights_nan", "weights_rank0"])
def test_bad_milora_files_are_refused_clearly(good, tmp_path, target, case):
    d = copy_dir(good / "good", tmp_path / case)
    make, exc, msg = _milora_case(case, d)
    make()
    _refused(target, lambda: target.load_adapter(d, "new"), exc, msg)


def test_bad_arguments_are_type_errors(good, target):
    _refused(target, lambda: target.load_adapter(good / "good", ["x"]), ValueError, "adapter names must be non-empty strings")
    _refused(target, lambda: target.load_adapter(None, "x"), TypeError, "must be a path")
    _refused(target, lambda: target.load_peft_adapter(3, "x"), TypeError, "must be a path")
    with pytest.raises(TypeError, match="adapter_name must be a string"):
        target.save_pretrained(good / "never", adapter_name=["keep"])


# ---- PEFT import (points 3, 6, 11) ----------------------------------------------------------

@pytest.mark.parametrize("over, msg", [
    (dict(rank_pattern={"q_proj": "abc"}), r"rank_pattern\['q_proj'\] must be an integer"),
    (dict(rank_pattern={"q_proj": None}), r"rank_pattern\['q_proj'\] must be an integer"),
    (dict(rank_pattern={"q_proj": 4.0}), r"rank_pattern\['q_proj'\] must be an integer"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern must be an object"),
    (dict(alpha_pattern={"v_proj": -8}), r"alpha_pattern\['v_proj'\] must be a finite number > 0"),
    (dict(alpha_pattern={"v_proj": 0}), r"alpha_pattern\['v_proj'\]"),
    (dict(rank_pattern={"(q_proj": 2}), r"rank_pattern key '\(q_proj' is not a valid regular expression"),
    (dict(alpha_pattern={"\\p{L}": 2}), "not a valid regular expression"),  # valid for `regex`, not for re / PEFT
    (dict(lora_dropout="x"), "lora_dropout must be a number in"),
    (dict(lora_alpha=-16), "lora_alpha must be a finite number > 0"),
    (dict(lora_alpha=0), "lora_alpha must be a finite number > 0"),
    (dict(r=4.9), "r must be an integer"),
    (dict(r="4"), "r must be an integer"),
    (dict(use_rslora="no"), "use_rslora must be true or false"),
    (dict(use_dora="false"), "use_dora must be true or false"),
    (dict(peft_type=["LORA"]), "peft_type"),
])
def test_bad_peft_configs_are_refused_clearly(tmp_path, target, over, msg):
    d = write_peft_dir(tmp_path / "p", **over)
    _refused(target, lambda: target.load_peft_adapter(d, "new"), ValueError, msg)


def test_bad_peft_tensors_are_refused_clearly(tmp_path, target):
    d = write_peft_dir(tmp_path / "rank0", ranks={(1, "v_proj"): 0}, rank_pattern={"v_proj": 4})
    _refused(target, lambda: target.load_peft_adapter(d, "new"), ValueError, "model.layers.1.self_attn.v_proj has rank 0")
    d = write_peft_dir(tmp_path / "zeros")
    edit_tensors(d / "adapter_model.safetensors", lambda t: t.__setitem__(
        peft_key("00", "self_attn", "q_proj", "A"), t[peft_key(0, "self_attn", "q_proj", "A")].clone()))
    _refused(target, lambda: target.load_peft_adapter(d, "new"), ValueError, "layer indices without leading zeros")


def _reference_pattern_value(patterns, name, default):
    """PEFT's get_pattern_key + dict lookup, with re (the semantics we must keep)."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def test_pattern_semantics_match_peft():
    patterns = {"model.layers.1.mlp.down_proj": 11, r"layers\.0\.self_attn\.(q|k)_proj": 12, "proj": 13,
                "v_proj|o_proj": 14, "1.self_attn.q_proj": 15, ".*gate_proj": 16, "up_proj$": 17, "q_pro": 18,
                "[0-9]\\.mlp\\..*": 19}
    names = [f"model.layers.{i}.{'self_attn' if m in ALL[:4] else 'mlp'}.{m}" for i in range(12) for m in ALL]
    compiled = peft_import._compile_patterns(patterns, "rank_pattern", "src", lambda v: True, "")
    got = peft_import._pattern_values(compiled, names, 4, "rank_pattern", "src", time.monotonic() + 10)
    want = {n: _reference_pattern_value(patterns, n, 4) for n in names}
    assert got == want
    assert len(set(want.values())) >= 6  # the patterns above really select different modules
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        return
    assert all(patterns.get(get_pattern_key(list(patterns), n), 4) == got[n] for n in names)


def test_rank_and_alpha_patterns_import(tmp_path):
    d = write_peft_dir(tmp_path / "p", ranks={(1, "q_proj"): 2, (0, "down_proj"): 6},
                       rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "model.layers.0.mlp.down_proj": 6},
                       alpha_pattern={"v_proj|down_proj": 3})
    model = MiLoRAModel.from_peft(tiny_model(seed=3), d)
    mods = model.adapters["default"].modules
    assert mods[(1, "q_proj")] == (2, 4.0) and mods[(0, "q_proj")] == (4, 2.0)
    assert mods[(0, "down_proj")] == (6, 0.5) and mods[(1, "v_proj")] == (4, 0.75)


def test_redos_patterns_are_bounded(tmp_path, target, monkeypatch):
    # the key: no catastrophic backtracking with the regex engine; it matches nothing
    d = write_peft_dir(tmp_path / "dots", rank_pattern={"(.|.)*!": 9})
    t0 = time.monotonic()
    target.load_peft_adapter(d, "dots")
    assert time.monotonic() - t0 < 30  # minutes before (a 2 s budget bounds it in any case)
    assert target.adapters["dots"].modules[(0, "q_proj")][0] == 4
    target.delete_adapter("dots")
    # a key that does backtrack catastrophically is cut off by the time budget, with a clear error
    monkeypatch.setattr(peft_import, "PATTERN_BUDGET_S", 0.2)
    d = write_peft_dir(tmp_path / "evil", rank_pattern={"q_proj": 4, r"(.|.)*\w\W": 2})
    t0 = time.monotonic()
    _refused(target, lambda: target.load_peft_adapter(d, "new"), ValueError,
             r"rank_pattern keys .* takes more than 0.2 s \(key '\(\.\|\.\)\*\\\\w\\\\W'")
    assert time.monotonic() - t0 < 20
    d = write_peft_dir(tmp_path / "long", rank_pattern={"a" * 5000: 2})
    _refused(target, lambda: target.load_peft_adapter(d, "new"), ValueError, "longer than 1024 characters")


# ---- atomic saves (point 8) and symlinks (point 10) ----------------------------------------

def _files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def _saved_pair(tmp_path):
    old, ref = milora_model(seed=2)
    d = tmp_path / "ckpt"
    old.save_pretrained(d)
    new, _ = milora_model(seed=2, config=MiLoRAConfig(r=2, alpha=4, top_k=2))  # another structure, same base
    return old, new, ref, d


def _loads_as(d, model):
    """d loads onto a fresh copy of the base of milora_model(seed=2) and gives model's logits."""
    loaded = MiLoRAModel.from_pretrained(tiny_model(seed=2), d)
    ids = _ids(1)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("fail_at", ["write_config", "rename_config", "rename_weights"])
def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, fail_at):
    old, new, _, d = _saved_pair(tmp_path)
    before = _files(d)
    calls = {"fsync": 0, "replace": 0}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls["fsync"] += 1
        if fail_at == "write_config" and calls["fsync"] == 2:  # the disk fills while writing the second file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    def replace(a, b):
        calls["replace"] += 1
        if (fail_at, calls["replace"]) in (("rename_weights", 1), ("rename_config", 2)):
            raise OSError(errno.EIO, "injected I/O error")
        real_replace(a, b)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space left|injected"):
        new.save_pretrained(d)
    monkeypatch.undo()
    assert _files(d) == before  # no temporaries or backups left, old bytes intact
    _loads_as(d, old)
    new.save_pretrained(d)      # and a save that works replaces it
    _loads_as(d, new)
    assert sorted(os.listdir(d)) == ["adapter_model.safetensors", "milora_config.json"]


def test_config_and_weights_of_different_saves_are_refused(tmp_path, target):
    old, new, _, d = _saved_pair(tmp_path)
    # a crash between the two renames: new weights beside the old config
    new.save_pretrained(tmp_path / "new")
    os.replace(tmp_path / "new" / "adapter_model.safetensors", d / "adapter_model.safetensors")
    _refused(target, lambda: target.load_adapter(d, "x"), ValueError, "comes from another save")
    # same structure, other values (a retrained adapter): the silently-wrong case of the issue
    again, _ = milora_model(seed=2)
    randomize_adapter(again, "default", seed=99)
    again.save_pretrained(tmp_path / "retrained")
    old.save_pretrained(tmp_path / "orig")
    os.replace(tmp_path / "retrained" / "adapter_model.safetensors", tmp_path / "orig" / "adapter_model.safetensors")
    _refused(target, lambda: target.load_adapter(tmp_path / "orig", "x"), ValueError, "comes from another save")


def test_save_does_not_follow_planted_symlinks(tmp_path):
    model, _ = milora_model(seed=2)
    victims = tmp_path / "victims"
    victims.mkdir()
    d = tmp_path / "out"
    d.mkdir()
    for name in ("milora_config.json", "adapter_model.safetensors"):
        (victims / name).write_text("precious")
        os.symlink(victims / name, d / name)
    model.save_pretrained(d)
    for name in ("milora_config.json", "adapter_model.safetensors"):
        assert (victims / name).read_text() == "precious"
        assert not os.path.islink(d / name)
    _loads_as(d, model)
    # a dangling link is replaced too, and the save directory must be a directory
    os.remove(d / "milora_config.json")
    os.symlink(tmp_path / "nowhere" / "x.json", d / "milora_config.json")
    model.save_pretrained(d)
    assert not (tmp_path / "nowhere").exists()
    _loads_as(d, model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save_pretrained(tmp_path / "file")
