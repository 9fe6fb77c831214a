"""The serving scenario of `milora-bench generate` on the micro model (seconds)."""
import pytest
import torch

pytest.importorskip("transformers")
from milora.bench import cli, serving  # noqa: E402


def test_schedule_is_seeded_and_within_ranges():
    s = serving.ServingSettings(requests=12, prompt_lens=(3, 9), new_tokens=(2, 5), rate=20.0, adapters=3, seed=4)
    a, b = serving.make_schedule(s, 256), serving.make_schedule(s, 256)
    assert a == b
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.new_tokens <= 5 and r.adapter in ("t0", "t1", "t2") for r in a)
    assert [r.at for r in a] == sorted(r.at for r in a) and a[0].at == 0.0 and a[-1].at > 0
    assert len({r.adapter for r in a}) > 1
    c = serving.make_schedule(serving.ServingSettings(requests=12, seed=5), 256)
    assert [r.prompt for r in c] != [r.prompt for r in a]


def test_cli_flags_map_onto_settings():
    args = cli.build_parser().parse_args(["generate", "--scenario", "serving", "--model", "micro", "--requests", "5",
                                          "--rate", "2.5", "--prompt-lens", "4:8", "--output-lens", "3:3",
                                          "--adapters", "2", "--methods", "milora"])
    s = serving.settings_from_args(args)
    assert (s.model, s.requests, s.rate, s.prompt_lens, s.new_tokens, s.adapters) == ("micro", 5, 2.5, (4, 8), (3, 3), 2)
    assert s.methods == ("milora",)
    for bad in (["--prompt-lens", "8:4"], ["--rate", "0"], ["--output-lens", "x"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["generate", "--scenario", "serving", *bad])


def test_serving_run_reports_ratios_to_base_and_checks_tokens():
    s = serving.ServingSettings(model="micro", requests=5, adapters=3, prompt_lens=(3, 10), new_tokens=(2, 5),
                                rate=100.0, methods=("base", "milora"), repeats=1, seed=1)
    lines = []
    recs = serving.run(s, "cpu", torch.float32, progress=False, printer=lines.append)
    by = {r["method"]: r for r in recs}
    assert set(by) == {"base", "milora"}
    assert by["base"]["tokens_per_s_x_base"] == 1.0
    for r in recs:
        assert r["scenario"] == "serving" and r["tokens_per_s"] > 0 and r["ttft_p99"] >= r["ttft_p50"] > 0
        assert r["tpot_p99"] >= r["tpot_p50"] > 0 and len(r["runs"]) == 1
        k, _, rest = r["checked"].partition("/")
        assert rest.startswith(k + " ")  # float32: every checked token equals per-request generate
    assert any(line.startswith("target (serving): MiLoRA tokens/s") for line in lines)
