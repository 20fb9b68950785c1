"""benchmarks/llm_scale.py on a tiny shape: the checkpoint it writes, the command it runs and
its table's measurements."""

import json
import os
import subprocess
import sys

import pytest

from qjax.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scale_benchmark_tiny(tmp_path):
    pytest.importorskip("compressed_tensors")
    d, blocks, mlp, heads, kv, vocab = 32, 2, 64, 4, 2, 50
    args = [
        f"--workdir={tmp_path}", f"--hidden_size={d}", f"--num_hidden_layers={blocks}",
        f"--intermediate_size={mlp}", f"--num_attention_heads={heads}",
        f"--num_key_value_heads={kv}", f"--vocab_size={vocab}", "--num_samples=4",
        "--seq_len=16", "--batch_size=2", "--group_size=16", "--methods=gptq",
        "--schedule=block_wise",
        f"--out={tmp_path / 'table.md'}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.llm_scale", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "table.json").read_text())
    head_dim = d // heads
    per_block = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * mlp + 2 * d
    assert result["num_params"] == 2 * vocab * d + blocks * per_block + d
    assert result["cache_bytes"] == 2 * 4 * 16 * d * 4
    (row,) = result["rows"]
    assert row["method"] == "gptq" and row["layers"] == 7 * blocks
    assert row["schedule"] == "block_wise" and row["block_pass_bytes"] > 0
    assert row["float32_parameter_bytes"] == 4 * result["num_params"]
    assert row["peak_host_memory_bytes"] > row["float32_parameter_bytes"]
    assert row["wall_seconds"] > row["quantize_seconds"] > 0
    assert "--method=gptq --bits=4 --group_size=16 --grid=signed" in row["command"]
    config = llama.read_config(tmp_path / "hf_model")
    assert (config["hidden_size"], config["num_key_value_heads"]) == (d, kv)
    assert config["torch_dtype"] == "float32"
    assert (tmp_path / "gptq_w4_g16" / "model.safetensors").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| gptq | block_wise | 14 |" in table and "python -m benchmarks.llm_scale" in table
