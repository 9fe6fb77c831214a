"""The benchmarks' verdict helpers: a missed target is blamed on a busy machine only when the
load average says so, not whenever the rounds disagree."""
import os

from milora.bench.timing import NOISY_SPREAD, noise_note


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


def test_unknown_load_keeps_the_busy_wording():
    assert "busy" in noise_note(_rec(1.0, 1.5, load=None))
