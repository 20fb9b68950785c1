"""The benchmark scripts run end to end at their smallest sizes and print their tables.

They measure nothing here (the sizes are too small for the ratios to mean anything); this only
keeps them from breaking. Run them in full as their docstrings say.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_benchmark(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpfq_layer_benchmark_prints_its_ratios():
    out = run_benchmark("benchmarks.gpfq_layer", "--small", "--repeats=1")
    assert "| qjax / floor |" in out
    for method in ("gpfq", "gptq"):
        assert f"| dense m=2000 N0=196 N1=100 | {method} |" in out
    assert re.search(r"\| conv 3x3 32→32, .* \| gpfq \| .* over 1 rounds\)", out), out
    assert "speed-up ×" in out
    try:  # the Brevitas part: its rows, or the line saying it is skipped
        import brevitas  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        assert "Brevitas: skipped (No module named" in out
        return
    brevitas_part = out[out.index("\nBrevitas ") :]
    for method in ("gpfq", "gptq", "qronos"):  # codes equal to Brevitas's, up to a few flips
        row = re.search(rf"\| dense m=2000 N0=196 N1=100 \| {method} \| (\S+) \|", brevitas_part)
        assert row and float(row[1]) >= 0.99, out


def test_gpfq_layer_benchmark_conv_statistics_agree():
    out = run_benchmark("benchmarks.gpfq_layer", "--conv-xla", "--small", "--repeats=1")
    for row in ("| patches, chunked (qjax) |", "| 9 XLA convolutions, one per window offset"):
        assert row in out
    difference = float(re.search(r"largest difference (\S+) of the largest entry", out)[1])
    # Both are float32 sums of m = 16·16·16 products in different orders: within γ_m = m·2⁻²⁴
    # of the largest entry (|G_ij| ≤ max_t G_tt, and likewise for H at these X~ ≈ X).
    assert difference < 16**3 * 2.0**-24


def test_export_benchmark_prints_its_table():
    out = run_benchmark(
        "benchmarks.export", "--models=mlp", "--bits=2", "--batch_size=8", "--repeats=1"
    )
    assert "| mlp | 2-bit per channel |" in out


@pytest.mark.slow
def test_gpfq_scale_benchmark_prints_its_tables():
    out = run_benchmark("benchmarks.gpfq_scale", "--small", "--skip-large", "--repeats=1")
    assert "| 196→125 | 500 | gpfq |" in out
    assert "cost curve" in out
    assert "| 8 |" in out  # the 8-simulated-device row


@pytest.mark.slow
def test_proxquant_step_benchmark_prints_its_ratios():
    out = run_benchmark("benchmarks.proxquant_step", "--batch_size=8", "--repeats=1")
    assert "adam + prox_quant binary" in out
    assert "ratio" in out


@pytest.mark.slow  # qwix's GPTQ alone takes minutes on 2 CPU cores, cold
def test_peers_benchmark_prints_both_libraries_or_says_qwix_is_missing():
    out = run_benchmark("benchmarks.peers", "--small", "--bits=4")
    try:
        import qwix  # noqa: F401
    except ImportError:
        assert "qwix is not installed" in out
        return
    for row in ("| 4 | qjax | gpfq |", "| 4 | qjax | gptq |", "| 4 | qwix | gptq |"):
        assert row in out
    assert "| 4 | qwix | rtn |" in out and "| 4 | qwix | qep |" in out  # run, or its refusal
    assert re.search(r"4-bit qjax GPFQ \(inputs \S+\) / qwix GPTQ: warm", out), out
