"""The benchmarks' verdict helpers: a missed target is blamed on a busy machine only when the
load average says so, not whenever the rounds disagree."""
import os

import torch

from milora.bench.timing import BASE_CAPS, NOISY_SPREAD, against, forced_level_note, noise_note, own_base_product_note


def _rec(q1, q3, load):
    return dict(ratio_q1=q1, ratio_q3=q3, repeats=9, load_avg=load)


def test_rounds_that_agree_need_no_note():
    assert noise_note(_rec(1.20, 1.20 + NOISY_SPREAD / 2, load=50.0)) == ""


def test_spread_on_an_idle_machine_is_uncertain_not_busy():
    cores = os.cpu_count() or 1
    note = noise_note(_rec(1.10, 1.10 + 2 * NOISY_SPREAD, load=cores + 0.4))
    assert "uncertain" in note and "idle machine" in note and "busy" not in note


def test_spread_under_load_is_a_busy_machine():
    cores = os.cpu_count() or 1
    note = noise_note(_rec(1.10, 1.10 + 2 * NOISY_SPREAD, load=cores + 3.0))
    assert "busy" in note and f"{cores + 3.0:.1f}" in note


def test_speed_spread_is_stated_in_tokens_per_s_like_its_target_line():
    # Generate's target line gives x base tokens/s (base time / method time); its spread must read
    # in those units: time ratios 1.25-1.60 are 0.62-0.80 x base tokens/s.
    note = noise_note(_rec(1.25, 1.60, load=0.0), speed=True)
    assert "x base tokens/s spread 0.62-0.80" in note
    assert "1.25" not in note and "1.60" not in note
    assert "paired ratios spread 1.25-1.60" in noise_note(_rec(1.25, 1.60, load=0.0))


def test_unknown_load_keeps_the_busy_wording():
    assert "busy" in noise_note(_rec(1.0, 1.5, load=None))


def test_forced_level_note_names_the_uncapped_base_and_how_to_emulate():
    note = forced_level_note(dict(device="cpu"), level="avx2", best="amx", env={})
    assert "forced to avx2" in note and "best level is amx" in note
    assert "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 MILORA_CPU_CAPABILITY=avx2" in note


def test_forced_level_note_only_when_forced_on_an_uncapped_cpu():
    assert forced_level_note(dict(device="cpu"), level="amx", best="amx", env={}) == ""
    assert forced_level_note(dict(device="cpu"), level="avx2", best="amx", env={"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ""
    assert forced_level_note(dict(device="cuda:0"), level="avx2", best="amx", env={}) == ""
    from milora_ext.cpu import LEVELS

    assert tuple(BASE_CAPS) == LEVELS  # one entry per kernel level


def test_a_ratio_that_reads_like_its_goal_gets_a_third_decimal():
    assert against(1.052, 1.05) == "1.052" and against(1.047, 1.05) == "1.047"
    assert against(1.07, 1.05) == "1.07" and against(0.7261, 0.73) == "0.726" and against(0.72, 0.73) == "0.72"


def test_own_base_product_note_only_where_the_tiles_compute_it():
    # bfloat16 on a CPU at amx: the op's base product is milora's own, and the generate output says so.
    note = own_base_product_note("cpu", torch.bfloat16, level="amx")
    assert "own AMX tiles" in note and "base_amx.h" in note
    for device, dtype, level in [("cpu", torch.float32, "amx"), ("cpu", torch.bfloat16, "avx512_bf16"),
                                 ("cpu", torch.bfloat16, "avx2"), ("cuda", torch.bfloat16, "amx")]:
        assert own_base_product_note(device, dtype, level=level) == ""
