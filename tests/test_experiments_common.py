"""Tests of the experiments' shared training loop: resume, config fingerprint, NaN, results."""

import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import qjax
from experiments import common

X = np.random.default_rng(0).normal(size=(48, 3)).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32)
BATCH = 12


def config(**fields):
    return ml_collections.ConfigDict({"seed": 0, "epochs": 4, "data_dir": "", **fields})


def noisy_loss(params, model_state, batch, key):
    """Least squares with random input dropout (so the PRNG key matters), counting calls."""
    x, y = batch
    keep = jax.random.bernoulli(key, 0.8, x.shape)
    loss = jnp.mean((jnp.where(keep, x, 0) @ params["w"] - y) ** 2)
    return loss, {"calls": model_state["calls"] + 1}


batches = common.shuffled_batches((X, Y), BATCH, seed=0)


def train(workdir, *, epochs=4, loss_fn=noisy_loss, seed=1):
    tx = optax.adam(0.05)
    state = common.TrainState.create(
        {"w": jnp.zeros(3)},
        tx,
        key=jax.random.key(seed),
        model_state={"calls": jnp.zeros((), jnp.int32)},
    )
    return common.run_phase(
        workdir,
        "phase",
        state,
        common.make_train_step(loss_fn, tx),
        batches,
        epochs=epochs,
        evaluate=lambda s: {"w0": s.params["w"][0]},
        log_every_steps=3,
    )


class Interrupted(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    full_state, full_history = train(common.open_workdir(config(), tmp_path / "a"))

    def kill_after_two(phase, epoch):
        if epoch == 2:
            raise Interrupted

    killed = common.open_workdir(config(), tmp_path / "b", on_checkpoint=kill_after_two)
    with pytest.raises(Interrupted):
        train(killed)
    resumed_state, resumed_history = train(common.open_workdir(config(), tmp_path / "b"))
    assert resumed_history == full_history
    assert len(full_history["step"]) == 4 * 4 // 3 and full_history["epoch"] == [1, 2, 3, 4]
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed_state.step) == 16 and int(resumed_state.model_state["calls"]) == 16
    # The keys matter: another seed gives other weights.
    other = train(common.open_workdir(config(), tmp_path / "c"), epochs=1)[0]
    reseeded = train(common.open_workdir(config(), tmp_path / "d"), epochs=1, seed=2)[0]
    assert not np.array_equal(other.params["w"], reseeded.params["w"])


def test_config_change_is_refused_with_the_fields_named(tmp_path):
    common.open_workdir(config(lr=0.1), tmp_path)
    common.open_workdir(config(lr=0.1, data_dir="/elsewhere"), tmp_path)  # not a result field
    with pytest.raises(common.ConfigMismatchError, match=r"lr: 0\.1 in the workdir, 0\.2 now"):
        common.open_workdir(config(lr=0.2), tmp_path)
    with pytest.raises(common.ConfigMismatchError, match="extra: '<absent>'"):
        common.open_workdir(config(lr=0.1, extra=1), tmp_path)
    common.open_workdir(config(lr=0.2, allow_config_change=True), tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["fields"]["lr"] == 0.2 and len(stored["replaced"]) == 1


@pytest.mark.parametrize(
    ("module", "variant"),
    [
        ("experiments.gpfq.configs.cifar10", "medium"),
        ("experiments.gpfq.configs.mnist_embedded", None),
        ("experiments.proxquant.configs.medium", None),
        ("experiments.ptb.configs.medium", None),
        ("experiments.lm.configs.ptb", None),
        ("experiments.export.configs.mnist_embedded", None),
    ],
)
def test_allow_config_change_is_a_field_of_every_experiment(module, variant):
    """`--config.allow_config_change=True` overrides a field of the (locked) config: it must
    exist, False by default, and stay out of the fingerprint."""
    import importlib

    get_config = importlib.import_module(module).get_config
    config = get_config(variant) if variant else get_config()
    assert config.allow_config_change is False
    config.lock()
    config.allow_config_change = True  # a locked ConfigDict refuses fields it does not have
    assert "allow_config_change" in common.NON_RESULT_FIELDS


def test_checkpoint_past_the_requested_epochs_is_refused(tmp_path):
    workdir = common.open_workdir(config(), tmp_path)
    train(workdir, epochs=3)
    with pytest.raises(common.ConfigMismatchError, match="after epoch 3, past the 2 epochs"):
        train(workdir, epochs=2)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def nan_from_step_six(params, model_state, batch, key):
        loss, model_state = noisy_loss(params, model_state, batch, key)
        return jnp.where(model_state["calls"] >= 6, jnp.nan, loss), model_state

    workdir = common.open_workdir(config(), tmp_path)
    with pytest.raises(common.NonFiniteLossError, match=r"epoch 2: .* nan at step 2 .*epoch 1\)"):
        train(workdir, loss_fn=nan_from_step_six)
    # Rerunning with a finite loss resumes from the good epoch 1.
    state, history = train(workdir, epochs=2)
    assert history["epoch"] == [1, 2] and int(state.step) == 8
    assert all(np.isfinite(history["train_loss"]))


def test_write_results_records_command_config_machine_and_qjax(tmp_path):
    workdir = common.open_workdir(config(), tmp_path)
    common.write_results(workdir, {"accuracy": np.float32(0.5)}, "| a |\n", config())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == 0.5 and saved["config"]["epochs"] == 4
    assert saved["machine"]["devices"] and saved["command"].startswith("python -m ")
    # The tests run from a git checkout of qjax: its HEAD commit is recorded.
    root = pathlib.Path(qjax.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert saved["qjax"]["version"] == qjax.__version__ and saved["qjax"]["commit"] == head
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Command: `python -m") and "Machine:" in table and "| a |" in table
    assert f"qjax {qjax.__version__}, commit {head}" in table


def test_library_key_changes_with_the_commit(monkeypatch):
    first = common.library_key()
    monkeypatch.setattr(
        common, "library", lambda: {"version": qjax.__version__, "commit": "0" * 40, "dirty": False}
    )
    assert common.library_key() != first


def test_time_steps_counts_what_the_config_runs():
    from experiments import time_steps
    from experiments.ptb.configs import tiny

    config = tiny.get_config()
    rows = time_steps.estimate_ptb(config, repeats=1)
    counts = {what: count for what, count, _ in rows}
    windows = (config.train_tokens // config.batch_size - 1) // config.bptt
    assert counts["float train step"] == config.warm_epochs * windows
    assert counts["ProxQuant 2-bit train step"] == len(config.reg_values) * windows
    assert len(rows) == 2 + 2 * len(config.bits)
    assert all(seconds > 0 for _, _, seconds in rows)
