"""End-to-end runs of the tiny configs of the ProxQuant experiments (CIFAR ResNet, PTB LSTM):
results, exact resume after a kill, the workdir's config check."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import common
from experiments.proxquant import train as cifar
from experiments.proxquant.configs import tiny as cifar_tiny
from experiments.ptb import train as ptb
from experiments.ptb.configs import tiny as ptb_tiny
from tests.jax_cache import compilation_cache_dir  # noqa: F401  (module fixture)


class Killed(Exception):
    """Raised from on_checkpoint to stop a run as a kill would, right after a saved epoch."""


def kill_at(phase, epoch):
    def on_checkpoint(name, saved):
        if (name, saved) == (phase, epoch):
            raise Killed

    return on_checkpoint


def final_states(workdir):
    """phase name ↦ the state in its latest checkpoint, as stored (nested dicts of arrays)."""
    root = os.path.join(workdir, "checkpoints")
    states = {}
    for phase in sorted(os.listdir(root)):
        epochs = [int(e) for e in os.listdir(os.path.join(root, phase)) if e.isdigit()]
        if epochs:
            path = os.path.join(root, phase, str(max(epochs)), "state")
            states[phase] = ocp.StandardCheckpointer().restore(path)
    return states


def assert_same_run(first, second, first_dir, second_dir):
    """Equal results (all but the command line) and bit-identical checkpoints of every phase."""
    strip = lambda r: {k: v for k, v in r.items() if k not in ("command", "machine")}
    assert json.dumps(strip(first), sort_keys=True) == json.dumps(strip(second), sort_keys=True)
    states_a, states_b = final_states(first_dir), final_states(second_dir)
    assert states_a.keys() == states_b.keys() and len(states_a) >= 3
    for a, b in zip(jax.tree.leaves(states_a), jax.tree.leaves(states_b), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    config = cifar_tiny.get_config()
    config.methods = ("binaryconnect", "proxquant_binary")
    workdir = str(tmp_path_factory.mktemp("cifar"))
    return config, workdir, cifar.train_and_evaluate(config, workdir)


def test_cifar_pipeline_end_to_end(cifar_run):
    config, workdir, results = cifar_run
    assert set(results["methods"]) == {"binaryconnect", "proxquant_binary"}
    steps = results["steps_per_epoch"] * config.quant.epochs
    for r in results["methods"].values():
        history = r["history"]
        assert history["step"] == list(range(1, steps + 1))  # logged every step
        # The sign changes logged inside the jitted step end where the host-level metric ends.
        assert history["step_sign_change"][-1] == pytest.approx(r["sign_change"], abs=1e-6)
        assert all(
            name.endswith("kernel") and "shortcut" not in name
            for name in r["sign_change_per_layer"]
        )
        assert r["final_valid_accuracy"] == r["frozen_history"]["valid_accuracy"][-1]
    proxquant, binaryconnect = (
        results["methods"]["proxquant_binary"],
        results["methods"]["binaryconnect"],
    )
    # ProxQuant with a strong λ ends on {±α}: hard quantization changes nothing.
    assert proxquant["distance_to_quantized_set"] < 1e-6
    assert proxquant["hard_quantized_accuracy"] == proxquant["soft_test_accuracy"]
    assert proxquant["reg"] == 100.0 and proxquant["reg_choice"] == "fixed"
    # BinaryConnect trains float weights behind the sign: they stay off the set.
    assert binaryconnect["distance_to_quantized_set"] > 0.05
    # BatchNorm statistics re-estimated for the binary weights: far above chance (10 %).
    assert proxquant["bn_reestimated_accuracy"] > 30.0
    for name in ("results.json", "results.md", "sign_changes.png", "config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_cifar_resume_after_a_kill_is_exact(cifar_run, tmp_path):
    config, workdir, results = cifar_run
    with pytest.raises(Killed):
        cifar.train_and_evaluate(
            config, str(tmp_path), on_checkpoint=kill_at("proxquant_binary_reg100", 1)
        )
    assert not (tmp_path / "results.json").exists()
    resumed = cifar.train_and_evaluate(config, str(tmp_path))
    assert_same_run(results, resumed, workdir, str(tmp_path))


@pytest.fixture(scope="module")
def ptb_run(tmp_path_factory):
    config = ptb_tiny.get_config()
    config.bits = (2,)
    config.reg_values = (1.0, 1e-3)
    workdir = str(tmp_path_factory.mktemp("ptb"))
    return config, workdir, ptb.train_and_evaluate(config, workdir)


def test_ptb_pipeline_end_to_end(ptb_run):
    _, workdir, results = ptb_run
    assert set(results["quantized"]) == {"proxquant_2bit", "straight_through_2bit"}
    uniform = 50.0  # the synthetic corpus has 50 words
    float_perplexity = results["float"]["test_perplexity"]
    assert float_perplexity < uniform / 1.5  # the warm start learned the chain
    for r in results["quantized"].values():
        assert r["test_perplexity"] < 1.5 * float_perplexity
    # λ is chosen on validation perplexity; the test perplexity reported is that λ's.
    proxquant = results["quantized"]["proxquant_2bit"]
    candidates = proxquant["reg_candidates"]
    assert [c["reg"] for c in candidates] == [1.0, 1e-3] and proxquant["reg_choice"] == "validation"
    best = min(candidates, key=lambda c: c["valid_perplexity"])
    assert (proxquant["reg"], proxquant["test_perplexity"]) == (
        best["reg"],
        best["test_perplexity"],
    )
    with open(os.path.join(workdir, "results.md")) as file:
        table = file.read()
    assert "| proxquant | " in table and "2-bit" in table


def test_ptb_resume_after_a_kill_is_exact(ptb_run, tmp_path):
    config, workdir, results = ptb_run
    with pytest.raises(Killed):
        ptb.train_and_evaluate(config, str(tmp_path), on_checkpoint=kill_at("float", 2))
    resumed = ptb.train_and_evaluate(config, str(tmp_path))
    assert_same_run(results, resumed, workdir, str(tmp_path))


def test_workdir_of_another_config_is_refused(ptb_run):
    _, workdir, _ = ptb_run
    changed = ptb_tiny.get_config()
    changed.bits = (2,)
    changed.reg_values = (1.0, 2e-3)
    with pytest.raises(common.ConfigMismatchError, match=r"reg_values: \[1\.0, 0\.001\] in the"):
        ptb.train_and_evaluate(changed, workdir)


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
