import json

import pytest

from milora import MODULE_NAMES, MiLoRAConfig


def test_defaults_match_the_paper():
    c = MiLoRAConfig()
    assert (c.r, c.alpha, c.top_k, c.pooler, c.activation, c.gate_mode) == (32, 64, 3, "self_attn", "rational", "soft")
    assert c.target_modules == MODULE_NAMES
    assert c.scaling == 2.0
    assert MiLoRAConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


def test_json_round_trip(tmp_path):
    c = MiLoRAConfig(r=8, alpha=16, dropout=0.1, target_modules=["v_proj", "q_proj"], top_k=2, pooler="max",
                     activation="gelu", gate_mode="hard", experts_per_module=4, routing="token", load_balance_coef=0.5)
    assert c.target_modules == ("q_proj", "v_proj")  # canonical order
    assert MiLoRAConfig.from_json_string(c.to_json_string()) == c
    path = tmp_path / "c.json"
    c.to_json_file(path)
    assert json.loads(path.read_text())["experts_per_module"] == 4
    assert MiLoRAConfig.from_json_file(path) == c


@pytest.mark.parametrize("kw, msg", [
    (dict(r=0), "r must be"),
    (dict(top_k=0), "top_k"),
    (dict(pooler="attn"), "pooler"),
    (dict(activation="relu"), "activation"),
    (dict(gate_mode="x"), "gate_mode"),
    (dict(routing="layer"), "routing"),
    (dict(experts_per_module=0), "experts_per_module"),
    (dict(dropout=1.0), "dropout"),
    (dict(target_modules=["q_proj", "lm_head"]), "unsupported module"),
    (dict(target_modules=[]), "empty"),
    (dict(load_balance_coef=-1), "load_balance_coef"),
])
def test_invalid_values_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MiLoRAConfig(**kw)


def test_unknown_json_field_raises():
    with pytest.raises(ValueError, match="unknown field"):
        MiLoRAConfig.from_dict({"r": 4, "rank": 4})
