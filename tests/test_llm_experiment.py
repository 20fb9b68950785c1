"""Tests of experiments/llm: the tiny run end to end (train, Hugging Face checkpoint, quantized
compressed-tensors checkpoints, perplexities, resume), the command lines it records, configs."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from experiments.llm import pipeline
from experiments.llm.configs import ptb, tiny
from qjax import data
from qjax.llm import pipeline as llm
from qjax.models import llama

pytest.importorskip("compressed_tensors")  # the quantized checkpoints' format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_end_to_end(tmp_path):
    config = tiny.get_config()
    results = pipeline.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["float"] == results["float"]
    assert saved["corpus"]["source"] == "package:qjax/data/tiny_english.txt"
    assert saved["command"].startswith("python -m") and saved["machine"]["devices"]
    assert saved["qjax_version"] and saved["train_steps"] == config.steps_per_epoch
    history = saved["history"]
    assert history["train_loss"][-1] < np.log(saved["corpus"]["vocab_size"])
    float_ppl = results["float"]["test_perplexity"]
    assert float_ppl < saved["corpus"]["vocab_size"] / 2  # well below a uniform guess
    # The saved checkpoint is the trained model, read as the command lines read it.
    corpus = llm.load_tokens("char", split="test")
    model = llama.from_pretrained(tmp_path / pipeline.FLOAT_CHECKPOINT)
    assert pipeline.evaluate_perplexity(model, corpus, config) == pytest.approx(float_ppl, rel=1e-5)
    # One entry per (method, bits, group size); each checkpoint reads back to its perplexity.
    entries = results["quantized"]
    assert [(e["method"], e["bits"], e["group_size"]) for e in entries] == pipeline.grid(config)
    for entry in entries:
        name = pipeline.entry_name(entry["method"], entry["bits"], entry["group_size"])
        quantized = llm.load_model(str(tmp_path / pipeline.QUANTIZED / name))
        value = pipeline.evaluate_perplexity(quantized, corpus, config)
        assert value == pytest.approx(entry["test_perplexity"], rel=1e-5)
        # W4 with groups of 32 stays near the float model, but is not the float model.
        assert value != float_ppl and 0.8 * float_ppl < value < 1.5 * float_ppl
        assert entry["quantize_seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| float |" in table and "| W4 g32 |" in table and "qjax.llm.quantize" in table
    assert f"qjax {saved['qjax_version']}, commit " in table
    # A second run trains and quantizes nothing again: the same results, the same files.
    packed = tmp_path / pipeline.QUANTIZED / "gptq_w4_g32" / "model.safetensors"
    mtime = packed.stat().st_mtime_ns
    again = pipeline.run(config, str(tmp_path))
    assert again["quantized"] == results["quantized"] and again["history"] == results["history"]
    assert packed.stat().st_mtime_ns == mtime


def test_recorded_command_reproduces_the_float_perplexity(tmp_path):
    config = tiny.get_config()
    config.steps_per_epoch = 2
    config.ptq.methods = ()
    results = pipeline.run(config, str(tmp_path))
    out = tmp_path / "ppl.json"
    command = [*shlex.split(results["float"]["command"]), f"--output={out}"]
    assert command[:3] == ["python", "-m", "qjax.llm.perplexity"]
    subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True, capture_output=True)
    measured = json.loads(out.read_text())["perplexity"]
    assert measured == pytest.approx(results["float"]["test_perplexity"], rel=1e-5)


def test_grid_names_and_commands():
    config = ptb.get_config()
    entries = pipeline.grid(config)
    assert len(entries) == 4 * 3 * 2 and entries[0] == ("gpfq", 4, 128)
    assert pipeline.entry_name("gptq", 3, 0) == "gptq_w3_channel"
    quantize, evaluate = pipeline.commands(config, "/m", "/q", ("qronos", 2, 128))
    assert "--method=qronos --bits=2 --group_size=128 --grid=signed --calibration=ptb" in quantize
    assert "--c=" not in quantize  # C unset: the command line's MSE-best default
    assert evaluate.startswith("python -m qjax.llm.perplexity --model_dir=/q --corpus=ptb")
    assert quantize.endswith("--seed=0 --damping=0.001")  # the config's chosen α
    quantize, _ = pipeline.commands(config, "/m", "/q", ("gptq", 2, 128))
    assert "--damping" not in quantize  # only Qronos's damping is set
    config.ptq.qronos_damping = None
    quantize, _ = pipeline.commands(config, "/m", "/q", ("qronos", 2, 128))
    assert "--damping" not in quantize  # None: Qronos's default


def test_an_entry_of_another_damping_is_redone(tmp_path):
    """A random-init model: what is tested is which damping each entry is measured at."""
    config = tiny.get_config()
    config.ptq.qronos_damping = None  # Qronos's default first
    tokens = llm.load_tokens("char", split="train")
    float_dir = str(tmp_path / "float")
    vocab = len(data.load_char_corpus().vocab)
    llama.save_pretrained(pipeline.make_model(config, vocab), float_dir)
    calibration = llm.calibration_batches(
        tokens, num_samples=8, seq_len=config.seq_len, batch_size=8, seed=0
    )
    test_tokens = llm.load_tokens("char", split="test")
    out_dir = str(tmp_path / "qronos")
    entry = ("qronos", 4, 32)
    packed = tmp_path / "qronos" / "model.safetensors"
    default = pipeline.quantize_entry(config, float_dir, out_dir, entry, calibration, test_tokens)
    assert default["damping"] is None and "--damping" not in default["commands"][0]
    config.ptq.qronos_damping = 1e-3
    damped = pipeline.quantize_entry(config, float_dir, out_dir, entry, calibration, test_tokens)
    assert damped["damping"] == 1e-3 and damped["commands"][0].endswith("--damping=0.001")
    report = json.loads((tmp_path / "qronos" / "report.json").read_text())
    assert report["spec"]["method_options"]["damping"] == 1e-3
    mtime = packed.stat().st_mtime_ns
    again = pipeline.quantize_entry(config, float_dir, out_dir, entry, calibration, test_tokens)
    assert again == damped and packed.stat().st_mtime_ns == mtime
    table = pipeline.results_markdown(
        {
            "float": {"valid_perplexity": 1.0, "test_perplexity": 1.0},
            "qjax_version": "0",
            "commit": "c",
            "num_params": 1,
            "train_steps": 1,
            "train_seconds": 60.0,
            "scale_constant": None,
            "quantized": [damped],
        }
    )
    assert "| weights | qronos (damping 0.001) |" in table


def test_bad_configs_raise():
    config = tiny.get_config()
    config.text_file = "/some/book.txt"
    with pytest.raises(ValueError, match="text_file"):
        pipeline.token_source(config)
    config = tiny.get_config()
    config.steps_per_epoch = -1
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pipeline.steps_per_epoch(config, 10_000)


def test_peers_benchmark_scores_like_qjax(tmp_path):
    """benchmarks/llm_peers.py's PyTorch perplexity is qjax's protocol; its table's ratios."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import llm_peers

    config = tiny.get_config()
    model = pipeline.make_model(config, 65)
    llama.save_pretrained(model, tmp_path)
    tokens = llm.load_tokens("char", split="test")[:1000]
    expected = llm.perplexity(model, tokens, seq_len=config.seq_len, batch_size=4)
    measured = llm_peers.torch_perplexity(
        str(tmp_path), tokens, seq_len=config.seq_len, batch_size=4
    )
    assert measured == pytest.approx(expected, rel=1e-4)
    rows = [
        {"tool": "llm-compressor", "method": "gptq", "seconds": 30.0, "perplexity": 100.0},
        {"tool": "qjax", "method": "gptq", "seconds": 10.0, "perplexity": 101.0},
    ]
    table = llm_peers.table(rows, str(tmp_path), True, (128, 128))
    assert "| qjax | gptq | 10.0 | 101.000 | 1.0100 | 3.00× |" in table
