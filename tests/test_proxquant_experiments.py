"""End-to-end runs of the tiny configs of both experiment binaries, and their resume."""

import json
import os

import pytest

from experiments.proxquant import train as cifar
from experiments.proxquant.configs import tiny as cifar_tiny
from experiments.ptb import train as ptb
from experiments.ptb.configs import tiny as ptb_tiny


def test_cifar_pipeline_end_to_end_and_resume(tmp_path):
    config = cifar_tiny.get_config()
    config.methods = ("binaryconnect", "proxquant_binary")
    workdir = str(tmp_path)
    results = cifar.train_and_evaluate(config, workdir)
    assert set(results["methods"]) == {"binaryconnect", "proxquant_binary"}
    for r in results["methods"].values():
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert 0.0 <= r["sign_change"] <= 1.0
        assert len(r["history"]["sign_change"]) == config.quant.epochs * 2  # 2 steps per epoch
        assert all(
            name.endswith("kernel") and "shortcut" not in name
            for name in r["sign_change_per_layer"]
        )
    # ProxQuant with a strong λ ends on {±1}; BinaryConnect keeps float weights.
    assert results["methods"]["proxquant_binary"]["distance_to_quantized_set"] < 1e-6
    for name in ("results.json", "results.md", "sign_changes.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    with open(os.path.join(workdir, "results.json")) as file:
        assert json.load(file)["float"]["test_accuracy"] == results["float"]["test_accuracy"]
    # A second run resumes every phase from its checkpoint and reproduces the results.
    again = cifar.train_and_evaluate(config, workdir)
    assert (
        again["methods"]["proxquant_binary"]["final_accuracy"]
        == (results["methods"]["proxquant_binary"]["final_accuracy"])
    )


def test_ptb_pipeline_end_to_end(tmp_path):
    config = ptb_tiny.get_config()
    config.bits = (2,)
    results = ptb.train_and_evaluate(config, str(tmp_path))
    assert set(results["quantized"]) == {"proxquant_2bit", "straight_through_2bit"}
    for r in results["quantized"].values():
        assert 1.0 < r["test_perplexity"] < 50.0 * 2  # vocabulary of 50: below uniform x 2
    table = (tmp_path / "results.md").read_text()
    assert "proxquant" in table and "2-bit" in table


@pytest.mark.parametrize(
    ("module", "config_module", "field", "value", "message"),
    [
        (cifar, cifar_tiny, "dataset", "imagenet", "dataset"),
        (ptb, ptb_tiny, "dataset", "wikitext", "dataset"),
    ],
)
def test_bad_config(tmp_path, module, config_module, field, value, message):
    config = config_module.get_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        module.train_and_evaluate(config, str(tmp_path))
