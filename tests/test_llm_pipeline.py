"""The LLM jobs: perplexity against NumPy, calibration windows, and both command lines."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.llm import pipeline
from qjax.models import llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = llama.LlamaConfig(
    vocab_size=70,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_perplexity_is_the_non_overlapping_window_protocol():
    model = llama.Llama(CONFIG, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 70, 203).astype(np.int32)
    seq_len = 20  # 10 windows of 20 tokens; the last 3 tokens are dropped
    windows = tokens[:200].reshape(10, 20)
    logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)
    expected = np.exp(nll.mean())
    for batch_size in (3, 10):
        value = pipeline.perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size)
        np.testing.assert_allclose(value, expected, rtol=1e-5)  # float32 sums of 190 NLLs
    with pytest.raises(ValueError, match="at least seq_len tokens"):
        pipeline.perplexity(model, tokens[:10], seq_len=seq_len, batch_size=1)
    with pytest.raises(ValueError, match="token"):
        pipeline.perplexity(model, tokens + 70, seq_len=seq_len, batch_size=1)


def test_calibration_batches_and_token_sources(tmp_path):
    ids = np.arange(1000, dtype=np.int32)
    batches = pipeline.calibration_batches(ids, num_samples=10, seq_len=16, batch_size=4, seed=1)
    assert [b.shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    for window in np.concatenate(batches):  # contiguous windows of the stream
        np.testing.assert_array_equal(np.diff(window), 1)
    np.save(tmp_path / "ids.npy", ids[:50])
    np.testing.assert_array_equal(pipeline.load_tokens(str(tmp_path / "ids.npy")), ids[:50])
    assert pipeline.load_tokens("char", split="valid").max() < 70
    with pytest.raises(FileNotFoundError, match="not 'ptb', 'char' or a file"):
        pipeline.load_tokens("no/such/file.txt")


def test_quantize_checkpoint_refuses_a_group_size_that_does_not_divide_the_inputs(tmp_path):
    from qjax.rules import LayerSpec

    llama.save_pretrained(llama.Llama(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "float")
    spec = LayerSpec(method="gptq", bits=4, group_size=24, grid="signed")
    with pytest.raises(ValueError, match=r"group_size 24 must divide .* layers/0/self_attn/q_proj"):
        pipeline.quantize_checkpoint(str(tmp_path / "float"), str(tmp_path / "out"), [], spec=spec)


@pytest.mark.parametrize(
    ("method", "group_size"),
    [("gpfq", 2), ("qronos", 16), (qjax.Qronos(act_order=True), 16), ("gptq", 2)],
    ids=["gpfq-g2", "qronos-g16", "qronos-act-g16", "gptq-g2"],
)
def test_quantize_checkpoint_group_wise_asymmetric(tmp_path, method, group_size):
    """Every method takes group-wise zero points: each layer's codes are letters of its alphabet
    (the export checks every weight), including k_proj and v_proj at g = 2, whose 32 inputs make
    16 groups for their 16 outputs (⌈N0/g⌉ = N1)."""
    pytest.importorskip("compressed_tensors")
    from qjax.rules import LayerSpec

    llama.save_pretrained(llama.Llama(CONFIG, rngs=nnx.Rngs(2)), tmp_path / "float")
    tokens = pipeline.load_tokens("char")
    calibration = pipeline.calibration_batches(
        tokens, num_samples=8, seq_len=32, batch_size=4, seed=0
    )
    spec = LayerSpec(method=method, bits=3, c=1.0, group_size=group_size, grid="asymmetric")
    report = pipeline.quantize_checkpoint(
        str(tmp_path / "float"), str(tmp_path / "out"), calibration, spec=spec
    )
    quantized_layers = [layer for layer in report["layers"] if layer["method"] != "skip"]
    assert len(quantized_layers) == 14
    assert all(0 < layer["relative_error"] < 1 for layer in quantized_layers)
    quantized = pipeline.load_model(str(tmp_path / "out"))
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(nnx.state(quantized, nnx.Param)))


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_command_lines_quantize_and_evaluate(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = llama.Llama(CONFIG, rngs=nnx.Rngs(1))
    llama.save_pretrained(model, tmp_path / "float")
    _run(
        "qjax.llm.quantize",
        f"--model_dir={tmp_path / 'float'}",
        f"--output_dir={tmp_path / 'w4'}",
        "--method=gpfq",
        "--bits=4",
        "--group_size=16",
        "--calibration=char",
        "--num_samples=8",
        "--seq_len=32",
        "--batch_size=4",
    )
    report = json.loads((tmp_path / "w4/report.json").read_text())
    assert report["spec"]["method"] == "gpfq" and report["spec"]["grid"] == "signed"
    assert len(report["layers"]) == 15 and report["skipped"] == ["lm_head"]
    assert report["calibration"] == {"batches": 2, "shape": [4, 32]}
    assert report["peak_host_memory_bytes"] > report["float32_parameter_bytes"] > 0
    assert all(0 < layer["relative_error"] < 1 for layer in report["layers"][:14])
    assert (tmp_path / "w4/report.md").read_text().count("| gpfq |") == 14

    results = {}
    for name in ("float", "w4"):
        _run(
            "qjax.llm.perplexity",
            f"--model_dir={tmp_path / name}",
            "--corpus=char",
            "--split=valid",
            "--seq_len=32",
            f"--output={tmp_path / name}.json",
        )
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
    tokens = pipeline.load_tokens("char", split="valid")
    quantized = pipeline.load_model(str(tmp_path / "w4"))
    expected = pipeline.perplexity(quantized, tokens, seq_len=32, batch_size=8)
    np.testing.assert_allclose(results["w4"], expected, rtol=1e-6)
    assert results["w4"] != results["float"]
    leaves = jax.tree.leaves(nnx.state(quantized, nnx.Param))
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_make_method_damping():
    assert pipeline.make_method("qronos") == qjax.Qronos()
    assert pipeline.make_method("qronos", damping=1e-4) == qjax.Qronos(damping=1e-4)
    assert pipeline.make_method("gptq", damping=0.1) == qjax.GPTQ(damping=0.1)
    with pytest.raises(ValueError, match="method 'gpfq' has no damping; only gptq, qronos"):
        pipeline.make_method("gpfq", damping=1e-4)
    with pytest.raises(ValueError, match="damping must be positive"):
        pipeline.make_method("gptq", damping=0.0)


def test_command_line_damping(tmp_path):
    """--damping reaches the method: the command line's checkpoint is the library's with
    Qronos(damping=0.1), not the default's; a method without damping is refused."""
    pytest.importorskip("compressed_tensors")
    from qjax.rules import LayerSpec

    llama.save_pretrained(llama.Llama(CONFIG, rngs=nnx.Rngs(3)), tmp_path / "float")
    args = [
        f"--model_dir={tmp_path / 'float'}",
        "--bits=2",
        "--group_size=16",
        "--calibration=char",
        "--num_samples=4",
        "--seq_len=32",
        "--batch_size=4",
    ]
    _run("qjax.llm.quantize", *args, f"--output_dir={tmp_path / 'cli'}", "--method=qronos",
         "--damping=0.1")  # fmt: skip
    report = json.loads((tmp_path / "cli/report.json").read_text())
    assert report["spec"]["method"] == "qronos"
    assert report["spec"]["method_options"]["damping"] == 0.1
    calibration = pipeline.calibration_batches(
        pipeline.load_tokens("char", split="train"),
        num_samples=4,
        seq_len=32,
        batch_size=4,
        seed=0,
    )
    kernels = {}
    for name, method in (("damped", qjax.Qronos(damping=0.1)), ("default", qjax.Qronos())):
        spec = LayerSpec(method=method, bits=2, group_size=16, grid="signed")
        pipeline.quantize_checkpoint(
            str(tmp_path / "float"), str(tmp_path / name), calibration, spec=spec
        )
    for name in ("cli", "damped", "default"):
        model = pipeline.load_model(str(tmp_path / name))
        kernels[name] = np.asarray(model.layers[1].mlp.down_proj.kernel.get_value())
    np.testing.assert_array_equal(kernels["cli"], kernels["damped"])
    assert not np.array_equal(kernels["cli"], kernels["default"])

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "qjax.llm.quantize", *args, f"--output_dir={tmp_path / 'msq'}",
         "--method=msq", "--damping=0.1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--damping: method 'msq' has no damping; only gptq, qronos take one" in result.stderr
    assert not (tmp_path / "msq").exists()
