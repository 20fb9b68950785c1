"""End-to-end runs of the tiny configs of the ProxQuant experiments (CIFAR ResNet, PTB LSTM):
results, exact resume after a kill, the workdir's config check."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import common
from experiments.proxquant import train as cifar
from experiments.proxquant.configs import tiny as cifar_tiny
from experiments.ptb import train as ptb
from experiments.ptb.configs import tiny as ptb_tiny
from qjax import prox, transforms
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
        (cifar, cifar_tiny, "methods", ("xnor",), "unknown method 'xnor'"),
        (ptb, ptb_tiny, "dataset", "wikitext", "dataset"),
        (ptb, ptb_tiny, "methods", ("xnor",), r"unknown methods \['xnor'\]"),
    ],
)
def test_bad_config(tmp_path, module, config_module, field, value, message):
    config = config_module.get_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        module.train_and_evaluate(config, str(tmp_path))


PARAMS = {"layer": {"kernel": jnp.array([[0.2, 0.9], [-0.4, 0.7]]), "bias": jnp.array([0.1, -0.3])}}
ONES = jax.tree.map(jnp.ones_like, PARAMS)


def test_ternary_proxquant_clips_to_one_after_every_prox():
    config = cifar_tiny.get_config()
    inner, last = cifar.quantization_optimizer(config, "proxquant_ternary", 10, 1.0)
    tx = optax.chain(inner, last)
    kernel = jnp.linspace(-1.5, 1.5, 8).reshape(2, 4)  # the float layers of the ternary mask too
    params = {name: {"kernel": kernel} for name in ("conv", "shortcut", "conv_init", "head")}
    updates, _ = tx.update(jax.tree.map(lambda p: -p, params), tx.init(params), params)
    kernel = optax.apply_updates(params, updates)["conv"]["kernel"]
    assert float(jnp.max(jnp.abs(kernel))) == 1.0  # Adam alone would move 1.5 to 1.51


def test_frozen_phase_continues_binaryconnect_at_its_decayed_learning_rate():
    config = cifar_tiny.get_config()
    steps_per_epoch = 5
    inner, _ = cifar.quantization_optimizer(config, "binaryconnect", steps_per_epoch, None)
    state = inner.init(PARAMS)
    for _ in range(config.quant.epochs * steps_per_epoch):
        _, state = inner.update(ONES, state, PARAMS)
    mask = lambda params: {"layer": {"kernel": True, "bias": False}}
    tx, opt_state = cifar.freeze_optimizer(inner, mask, state, PARAMS)
    updates, _ = tx.update(ONES, opt_state, PARAMS)
    np.testing.assert_array_equal(updates["layer"]["kernel"], 0.0)
    # A steady gradient makes Adam's step the learning rate: 0.01 after two ×0.1 decays.
    np.testing.assert_allclose(updates["layer"]["bias"], -1e-4, rtol=1e-3)


def test_ptb_prox_strength_follows_the_decayed_learning_rate():
    config = ptb_tiny.get_config()  # λ_t grows per step
    quantizer = prox.multibit_quantizer(1, channel_axis=None)
    reg = 0.01
    tx = ptb.make_optimizer(config, [(quantizer, None)], steps_per_epoch=1, reg=reg)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(2):  # then λ_t = 2λ
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    plateau = ptb.divide_on_plateau(config.lr_plateau_factor)
    train_state = common.TrainState.create(params, tx, key=jax.random.key(0), opt_state=state)
    decayed = plateau(train_state, {"valid_perplexity": [10.0, 11.0]}).opt_state
    learning_rate = config.learning_rate / config.lr_plateau_factor
    assert float(decayed.hyperparams["learning_rate"]) == pytest.approx(learning_rate)
    new = optax.apply_updates(params, tx.update(zeros, decayed, params)[0])
    strength = learning_rate * reg * 2  # η_t·λ_t at the decayed η_t, not the base η
    for theta, moved in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        expected = prox.pull_prox(theta, strength, quantizer.project(theta))
        np.testing.assert_allclose(moved, expected, rtol=1e-6)
        assert not np.allclose(moved, theta)


def _summed_pull(*, learning_rate, reg, steps_per_epoch, epochs, growth):
    """Σ_t η·λ_t, step by step, over the strength schedule the experiment's prox runs with."""
    strength = transforms.linear_reg_schedule(
        learning_rate=learning_rate, reg=reg, steps_per_epoch=steps_per_epoch, growth=growth
    )
    return float(np.sum([strength(t) for t in range(steps_per_epoch * epochs)], dtype=np.float64))


@pytest.mark.parametrize("name", ["reduced", "medium"])
def test_short_cifar_configs_keep_the_papers_total_pull(name):
    """The λ of the short configs, summed step by step over their schedules, pulls as far as the
    paper's λ = 1e-4 summed over its 390 steps × 200 (binary) or 400 (ternary) epochs, growing
    per epoch. The configs round λ to 3 significant digits: a relative error of at most 5e-3."""
    config = importlib.import_module(f"experiments.proxquant.configs.{name}").get_config()
    steps_per_epoch = (config.train_size - config.validation_size) // config.batch_size
    for kind, paper_epochs in (("binary", 200), ("ternary", 400)):
        (reg,) = config.quant[f"reg_{kind}_values"]
        pull = _summed_pull(
            learning_rate=config.quant.learning_rate,
            reg=reg,
            steps_per_epoch=steps_per_epoch,
            epochs=config.quant.epochs,
            growth=config.quant.reg_growth,
        )
        paper = _summed_pull(
            learning_rate=0.01, reg=1e-4, steps_per_epoch=390, epochs=paper_epochs, growth="epoch"
        )
        assert pull == pytest.approx(paper, rel=5e-3), kind


@pytest.mark.parametrize("variant", ["full", "tiny"])
def test_fair_config_grid_holds_the_papers_final_strength_and_smaller(variant):
    """The λ grid, run through the experiment's strength schedule, reaches at the last quantized
    step the paper's per-step strength η·λ_t = 2e-4, and smaller and larger ones."""
    from experiments.proxquant.configs import fair

    config = fair.get_config(variant)
    steps_per_epoch = (config.train_size - config.validation_size) // config.batch_size
    last = steps_per_epoch * config.quant.epochs - 1
    for kind in ("binary", "ternary"):
        finals = [
            transforms.linear_reg_schedule(
                learning_rate=config.quant.learning_rate,
                reg=reg,
                steps_per_epoch=steps_per_epoch,
                growth=config.quant.reg_growth,
            )(last)
            for reg in config.quant[f"reg_{kind}_values"]
        ]
        ratios = sorted(f / 2e-4 for f in finals[:-1])
        np.testing.assert_allclose(ratios, fair.STRENGTH_MULTIPLES, rtol=5e-3)
        assert min(finals) < 2e-4 < max(finals)
