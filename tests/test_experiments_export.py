"""The export experiment end to end, on its tiny config (embedded MNIST subset)."""

from __future__ import annotations

import json
import os

import pytest

from experiments.export import pipeline
from experiments.export.configs import mnist_embedded


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = mnist_embedded.get_config("tiny")
    config.export_num_letters = (3,)
    workdir = str(tmp_path_factory.mktemp("export"))
    return config, workdir, pipeline.export_and_evaluate(config, workdir)


def test_packed_model_predicts_as_the_fake_quantized_model(tiny_run):
    _, workdir, results = tiny_run
    (row,) = results["rows"]
    assert row["name"] == "gpfq_ternary" and row["bits"] == [2]
    assert row["same_predictions"] == 100.0
    assert row["packed_accuracy"] == row["fake_quant_accuracy"]
    assert row["max_logit_difference"] < 1e-5
    # Ternary codes take 2 bits of the 32 of a float: 1/16 of the kernel bytes.
    assert row["kernel_packed_bytes"] * 16 == pytest.approx(row["kernel_float_bytes"], rel=0.01)
    for name in ("results.json", "results.md", "bytes.png", "checkpoints/packed_gpfq_ternary"):
        assert os.path.exists(os.path.join(workdir, name))
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["command"].startswith("python -m ") and saved["machine"]["devices"]
    assert set(saved["data_source"]) == {"train", "valid", "test"}


def test_exports_a_given_quantized_checkpoint(tiny_run):
    config, workdir, first = tiny_run
    config.quantized_checkpoint = os.path.join(workdir, "checkpoints", "quantized_gpfq_ternary")
    results = pipeline.export_and_evaluate(config, os.path.join(workdir, "given"))
    (row,) = results["rows"]
    assert row["name"] == "given"
    assert row["packed_accuracy"] == first["rows"][0]["packed_accuracy"]
