"""The training loop the experiments share: state, step, epochs, checkpoints, resume, results.

An experiment composes four pieces:

* `TrainState`: step count, PRNG key, parameters, optimizer state and the model's other state
  (Linen collections such as `batch_stats`, an RNN's carry, or an NNX model's non-parameter
  state), one pytree that orbax saves as a whole.
* `make_train_step(loss_fn, tx)`: a jitted `(state, batch) -> (state, metrics)` from a loss
  function `loss_fn(params, model_state, batch, key) -> (loss, model_state)` and any optax
  optimizer. The step's PRNG key is `fold_in(state.rng, state.step)`, so a resumed run draws
  the same keys as an uninterrupted one.
* `open_workdir(config, path)`: checks the workdir against the config that made it (a
  fingerprint of every field except `NON_RESULT_FIELDS`) and returns a `Workdir`.
* `run_phase(workdir, name, state, train_step, batches, epochs=...)`: epochs of steps, an orbax
  checkpoint after every epoch, resume from the latest one, a clear error on a non-finite loss
  (the last good checkpoint stays). `batches(epoch)` gives the epoch's batches; with
  `epoch_order` the order is a function of (seed, epoch) alone, so it is restored on resume.

A fourth experiment (say a transformer language model in Linen) needs only its loss::

    def loss_fn(params, model_state, batch, key):
        inputs, targets = batch
        logits = model.apply({"params": params}, inputs, rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, model_state

    workdir = common.open_workdir(config, path)
    tx = optax.adamw(optax.cosine_onecycle_schedule(total_steps, 3e-3))
    state = common.TrainState.create(params, tx, key=common.phase_key(config.seed, "float"))
    streams = qjax.data.batchify(tokens, config.batch_size)
    state, history = common.run_phase(
        workdir, "float", state, common.make_train_step(loss_fn, tx),
        lambda epoch: qjax.data.bptt_windows(streams, config.seq_len, drop_remainder=True),
        epochs=config.epochs, evaluate=lambda s: {"valid_loss": ...},
    )

(With Flax NNX, keep `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`; put `params`
and `rest` in the state and `nnx.merge` them inside `loss_fn`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

import qjax
from qjax import data

__all__ = [
    "NON_RESULT_FIELDS",
    "ConfigMismatchError",
    "NonFiniteLossError",
    "Splits",
    "TrainState",
    "Workdir",
    "classifier_accuracy",
    "classifier_loss",
    "epoch_order",
    "hold_out",
    "machine",
    "make_train_step",
    "mean_std",
    "open_workdir",
    "phase_key",
    "run_phase",
    "shuffled_batches",
    "write_results",
]

# Config fields that never change a result: where data and outputs live, and this override.
NON_RESULT_FIELDS = ("data_dir", "allow_config_change")
CONFIG_FILE = "config.json"

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Any]]
TrainStep = Callable[["TrainState", Any], tuple["TrainState", dict[str, jax.Array]]]


class ConfigMismatchError(ValueError):
    """A workdir holds the outputs of another config (or more epochs than requested)."""


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the checkpoint of the last good epoch is kept."""


class TrainState(flax.struct.PyTreeNode):
    """Everything a training phase needs to continue exactly where it stopped.

    Attributes:
      step: optimizer steps taken in this phase (int32 scalar).
      rng: raw PRNG key data (`jax.random.key_data`), the phase's base key.
      params: the trained parameters θ.
      opt_state: the optimizer's state.
      model_state: the model's other state: Linen collections ({"batch_stats": ...}), an RNN's
        carry, an NNX model's non-parameter state, or {} when there is none.
    """

    step: jax.Array
    rng: jax.Array
    params: Any
    opt_state: Any
    model_state: Any

    @classmethod
    def create(
        cls,
        params: Any,
        tx: optax.GradientTransformation,
        *,
        key: jax.Array,
        model_state: Any = None,
        opt_state: Any = None,
    ) -> TrainState:
        """A fresh state at step 0.

        Args:
          params: the initial parameters.
          tx: the optimizer; its state is `tx.init(params)` unless `opt_state` is given.
          key: the phase's PRNG key (e.g. `phase_key(config.seed, name)`).
          model_state: the model's other state (default {}).
          opt_state: an optimizer state to continue from (e.g. that of an earlier phase).

        Returns:
          The `TrainState`.
        """
        return cls(
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(key),
            params=params,
            opt_state=tx.init(params) if opt_state is None else opt_state,
            model_state={} if model_state is None else model_state,
        )


def phase_key(seed: int, name: str) -> jax.Array:
    """A PRNG key for the phase `name` of a run seeded with `seed` (distinct per phase)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    metrics_fn: Callable[[TrainState], Mapping[str, jax.Array]] | None = None,
) -> TrainStep:
    """A jitted training step: loss and gradient at θ, then the optimizer's update.

    Args:
      loss_fn: `(params, model_state, batch, key) -> (loss, new model_state)`; a parameter map
        such as BinaryConnect's `qjax.straight_through` belongs inside it.
      tx: any optax optimizer (chains ending in `qjax.prox_quant` receive `params`).
      metrics_fn: scalars to record after each step, computed from the new state inside the
        jitted step (e.g. the fraction of signs flipped since a warm start).

    Returns:
      `step(state, batch) -> (state, metrics)`, metrics a dict of scalars with "loss" (the loss
      before the update) and those of `metrics_fn`.
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state=model_state,
        )
        metrics = {"loss": loss}
        if metrics_fn is not None:
            metrics.update(metrics_fn(state))
        return state, metrics

    return jax.jit(step)


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffled order of `size` examples in `epoch`: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def shuffled_batches(
    arrays: tuple[np.ndarray, ...], batch_size: int, *, seed: int
) -> Callable[[int], Iterator[tuple[np.ndarray, ...]]]:
    """epoch ↦ that epoch's full batches of `arrays` (same first axis), in `epoch_order`.

    Args:
      arrays: e.g. (images, labels).
      batch_size: examples per batch; the last incomplete batch of an epoch is dropped.
      seed: with the epoch, fixes the order.

    Returns:
      The `batches` function `run_phase` takes.
    """
    size = len(arrays[0])
    if not 1 <= batch_size <= size:
        raise ValueError(f"batch_size must be in [1, {size}] (the examples), got {batch_size}")

    def batches(epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        order = epoch_order(seed, epoch, size)
        for start in range(0, size - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield tuple(a[index] for a in arrays)

    return batches


class Splits(NamedTuple):
    """Training images, the validation images held out of them, and the test images."""

    train: data.ImageDataset
    valid: data.ImageDataset
    test: data.ImageDataset


def hold_out(
    dataset: data.ImageDataset, size: int, *, seed: int
) -> tuple[data.ImageDataset, data.ImageDataset]:
    """Split a training set into (rest, validation): `size` examples drawn at random by `seed`.

    The validation split is held out of training and used for every choice (scale constants,
    λ, epochs); the test split is only reported.

    Args:
      dataset: the training split.
      size: validation examples, 1 <= size < len(dataset).
      seed: fixes the draw.

    Returns:
      (the training examples left, the validation examples), both in the stored order.
    """
    n = len(dataset.labels)
    if not 1 <= size < n:
        raise ValueError(
            f"validation_size must be in [1, {n - 1}] ({n} training examples), got {size}"
        )
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).choice(n, size, replace=False)] = True
    pick = lambda mask: dataset._replace(images=dataset.images[mask], labels=dataset.labels[mask])
    return pick(~held), pick(held)


def classifier_loss(
    model: Any,
    *,
    normalize: Callable[[jax.Array], jax.Array],
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    param_map: Callable[[Any], Any] | None = None,
) -> LossFn:
    """The cross-entropy `loss_fn` of a Linen image classifier called as `model(x, train=...)`.

    Args:
      model: the Linen module; its collections other than "params" (e.g. "batch_stats") live in
        the state's `model_state` and are updated by the training-mode forward pass.
      normalize: uint8 images ↦ the model's float inputs.
      augment: (uint8 images, key) ↦ augmented images, before `normalize` (None: no augmentation).
      param_map: θ ↦ the weights the forward pass sees (BinaryConnect: `qjax.straight_through`).

    Returns:
      `loss_fn(params, model_state, (images, labels), key) -> (loss, model_state)`; the key also
      drives dropout.
    """

    def loss_fn(params, model_state, batch, key):
        images, labels = batch
        augment_key, dropout_key = jax.random.split(key)
        if augment is not None:
            images = augment(images, augment_key)
        weights = params if param_map is None else param_map(params)
        logits, mutated = model.apply(
            {"params": weights, **model_state},
            normalize(images),
            train=True,
            rngs={"dropout": dropout_key},
            mutable=list(model_state),
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, dict(mutated)

    return loss_fn


def classifier_accuracy(
    model: Any,
    normalize: Callable[[jax.Array], jax.Array],
    *,
    batch_size: int,
) -> Callable[[Any, np.ndarray, np.ndarray], float]:
    """A jitted evaluation: (variables, uint8 images, labels) ↦ accuracy in %, in eval mode.

    Args:
      model: the Linen classifier, called as `model.apply(variables, x, train=False)`.
      normalize: uint8 images ↦ the model's float inputs.
      batch_size: images per forward pass.

    Returns:
      The evaluation function (compiled once per batch shape).
    """
    predict = jax.jit(
        lambda variables, images: jnp.argmax(
            model.apply(variables, normalize(images), train=False), -1
        )
    )

    def accuracy(variables: Any, images: np.ndarray, labels: np.ndarray) -> float:
        if len(labels) == 0:
            raise ValueError("accuracy of an empty split")
        correct = 0
        for start in range(0, len(labels), batch_size):
            predictions = predict(variables, images[start : start + batch_size])
            correct += int(jnp.sum(predictions == labels[start : start + batch_size]))
        return 100.0 * correct / len(labels)

    return accuracy


# ------------------------------------------------------------------------------------------
# The workdir: config fingerprint, checkpoints.
# ------------------------------------------------------------------------------------------


def _flat_fields(
    config: ml_collections.ConfigDict, *, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """'a.b' → value for every leaf field of the config, sequences as lists (JSON-comparable).

    Fields named in `NON_RESULT_FIELDS` or `ignore` (by their last component) are left out.
    """

    def flatten(prefix: str, value: Any) -> dict[str, Any]:
        if isinstance(value, Mapping):
            out = {}
            for key in sorted(value):
                out.update(flatten(f"{prefix}{key}.", value[key]))
            return out
        if isinstance(value, tuple | list):
            value = list(value)
        return {prefix[:-1]: value}

    fields = flatten("", config.to_dict())
    left_out = (*NON_RESULT_FIELDS, *ignore)
    return {k: v for k, v in fields.items() if k.rsplit(".", 1)[-1] not in left_out}


def fingerprint(config: ml_collections.ConfigDict, *, ignore: Sequence[str] = ()) -> str:
    """sha256 of the config's result-changing fields (all but `NON_RESULT_FIELDS` and `ignore`)."""
    text = json.dumps(_flat_fields(config, ignore=ignore), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(stored) | set(current)):
        missing = "<absent>"
        old, new = stored.get(key, missing), current.get(key, missing)
        if json.dumps(old, default=str) != json.dumps(new, default=str):
            lines.append(f"{key}: {old!r} in the workdir, {new!r} now")
    return lines


@dataclasses.dataclass(frozen=True)
class Workdir:
    """An experiment's output folder, checked against its config by `open_workdir`.

    Attributes:
      path: the absolute path.
      on_checkpoint: called as `on_checkpoint(phase, epoch)` after each saved epoch (logging,
        or a test that simulates a kill by raising from it).
    """

    path: str
    on_checkpoint: Callable[[str, int], None] | None = None

    def file(self, name: str) -> str:
        """The path of a file in the workdir."""
        return os.path.join(self.path, name)


def open_workdir(
    config: ml_collections.ConfigDict,
    path: str,
    *,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> Workdir:
    """Create or reopen a workdir, refusing one made by a different config.

    The first call writes `config.json` (the fingerprint and every result-changing field).
    Later calls compare: any difference raises `ConfigMismatchError` naming the fields, unless
    `config.allow_config_change` is True, in which case the new config is recorded and the
    checkpoints are reused as they are.

    Args:
      config: the experiment's config.
      path: the workdir.
      on_checkpoint: see `Workdir`.

    Returns:
      The `Workdir`.

    Raises:
      ConfigMismatchError: the workdir holds another config's outputs.
    """
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    record = {"fingerprint": fingerprint(config), "fields": _flat_fields(config)}
    config_file = os.path.join(path, CONFIG_FILE)
    if os.path.exists(config_file):
        with open(config_file) as file:
            stored = json.load(file)
        if stored["fingerprint"] != record["fingerprint"]:
            differences = _differences(stored["fields"], record["fields"])
            if not config.get("allow_config_change", False):
                raise ConfigMismatchError(
                    f"workdir {path} was made by another config; the fields that differ:\n  "
                    + "\n  ".join(differences)
                    + "\nUse a fresh workdir, or set config.allow_config_change=True to continue "
                    "from its checkpoints anyway."
                )
            logging.warning(
                "config.allow_config_change: reusing %s made by another config (%s)",
                path,
                "; ".join(differences),
            )
            record["replaced"] = [*stored.get("replaced", []), stored["fingerprint"]]
    with open(config_file, "w") as file:
        json.dump(record, file, indent=1, default=str)
    return Workdir(path, on_checkpoint)


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax's per-save INFO lines (they would drown the training log)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


class _PhaseCheckpoints:
    """Orbax checkpoints of one phase, (state, history) per epoch, the latest kept."""

    def __init__(self, directory: str):
        with quiet_orbax():
            self.manager = ocp.CheckpointManager(
                directory, options=ocp.CheckpointManagerOptions(max_to_keep=1)
            )

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state: TrainState, history: dict) -> None:
        with quiet_orbax():
            self.manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
                ),
            )
            self.manager.wait_until_finished()  # a kill right after loses nothing

    def restore(self, epoch: int, like: TrainState) -> tuple[TrainState, dict]:
        with quiet_orbax():
            restored = self.manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(like), history=ocp.args.JsonRestore()
                ),
            )
        return restored.state, dict(restored.history)


# ------------------------------------------------------------------------------------------
# Training phases.
# ------------------------------------------------------------------------------------------


def _check_finite(name: str, epoch: int, losses: np.ndarray, checkpoint: str) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        kept = (
            f"The last good checkpoint (epoch {epoch}) is in {checkpoint}"
            if epoch
            else "No epoch of this phase was saved"
        )
        raise NonFiniteLossError(
            f"phase {name!r}, epoch {epoch + 1}: the training loss is {losses[bad[0]]} at step "
            f"{bad[0] + 1} of the epoch; stopped without saving this epoch. {kept}. Lower the "
            "learning rate (or check the data) and rerun."
        )


def run_phase(
    workdir: Workdir,
    name: str,
    state: TrainState,
    train_step: TrainStep,
    batches: Callable[[int], Iterable[Any]],
    *,
    epochs: int,
    evaluate: Callable[[TrainState], Mapping[str, float]] | None = None,
    end_of_epoch: Callable[[TrainState, dict], TrainState] | None = None,
    log_every_steps: int = 0,
) -> tuple[TrainState, dict]:
    """Train for `epochs`, checkpointing after each epoch and resuming from the latest one.

    Every epoch: the steps over `batches(epoch)`, then `evaluate(state)`, then
    `end_of_epoch(state, history)` (e.g. a learning-rate decay on a validation plateau), then an
    orbax checkpoint of (state, history) in `<workdir>/checkpoints/<name>`. A later call with the
    same arguments restores the latest checkpoint and continues: the state holds the step count
    and PRNG key, and `batches(epoch)` must depend on the epoch alone (see `epoch_order`), so the
    result equals that of an uninterrupted run.

    Args:
      workdir: from `open_workdir`.
      name: the phase's name (its checkpoint folder).
      state: the initial state (also the structure a checkpoint is restored into).
      train_step: from `make_train_step`.
      batches: epoch (0-based) ↦ the epoch's batches.
      epochs: epochs to train in total.
      evaluate: state ↦ metrics recorded after each epoch (e.g. validation accuracy).
      end_of_epoch: (state, history) ↦ state, after `evaluate`, before the checkpoint.
      log_every_steps: also record the step metrics at every this-many steps (0: never).

    Returns:
      (final state, history): history["epoch"], "train_<metric>" (epoch means of the step
      metrics), the `evaluate` metrics by epoch, and "step" / "step_<metric>" when logged.

    Raises:
      ConfigMismatchError: the phase's checkpoint is past `epochs`.
      NonFiniteLossError: a training loss became NaN or infinite (nothing of that epoch saved).
    """
    if epochs < 0:
        raise ValueError(f"phase {name!r}: epochs must be >= 0, got {epochs}")
    directory = os.path.join(workdir.path, "checkpoints", name)
    checkpoints = _PhaseCheckpoints(directory)
    history: dict[str, list] = {"epoch": []}
    start = checkpoints.latest_epoch() or 0
    if start > epochs:
        raise ConfigMismatchError(
            f"phase {name!r} in {workdir.path} has a checkpoint after epoch {start}, past the "
            f"{epochs} epochs requested; use a fresh workdir"
        )
    if start:
        state, history = checkpoints.restore(start, state)
        logging.info("%s: resumed after epoch %d", name, start)
    # Restored arrays are committed to their devices; commit fresh ones too, so that a resumed
    # run calls the step with the same signature (and the same compiled program).
    state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)
    progress = tqdm(desc=name, total=epochs - start, unit="epoch", disable=None)
    for epoch in range(start, epochs):
        step_metrics = []
        for batch in batches(epoch):
            state, metrics = train_step(state, batch)
            step_metrics.append(metrics)
        if not step_metrics:
            raise ValueError(f"phase {name!r}: batches({epoch}) gave no batch")
        stacked = {k: np.asarray(jnp.stack([m[k] for m in step_metrics])) for k in step_metrics[0]}
        _check_finite(name, epoch, stacked["loss"], directory)
        record = {f"train_{k}": float(v.mean()) for k, v in stacked.items()}
        if log_every_steps:
            first = int(state.step) - len(step_metrics)
            for i in range(len(step_metrics)):
                if (first + i + 1) % log_every_steps == 0:
                    history.setdefault("step", []).append(first + i + 1)
                    for k, v in stacked.items():
                        history.setdefault(f"step_{k}", []).append(float(v[i]))
        if evaluate is not None:
            record.update({k: float(v) for k, v in evaluate(state).items()})
        history["epoch"].append(epoch + 1)
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        if end_of_epoch is not None:
            state = end_of_epoch(state, history)
        logging.info(
            "%s epoch %d: %s", name, epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items())
        )
        checkpoints.save(epoch + 1, state, history)
        progress.update()
        if workdir.on_checkpoint is not None:
            workdir.on_checkpoint(name, epoch + 1)
    progress.close()
    return state, history


# ------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine a result was measured on: platform, CPU count, Python, JAX and its devices."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }


def library() -> dict[str, Any]:
    """The qjax that produced a result: its version, and its git commit when qjax is imported
    from a git checkout ("dirty" when that checkout has uncommitted changes), else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(qjax.__file__)))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": qjax.__version__, "commit": commit, "dirty": bool(status)}


def library_key() -> str:
    """A short key for caches of results: qjax's version and commit (and whether it was dirty),
    so that a cached result is never reused by another library."""
    info = library()
    text = f"{info['version']}:{info['commit']}:{info['dirty']}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1) of the seeds' values (at least two)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"a standard deviation over seeds needs two or more values, got {values}")
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_results(
    workdir: Workdir, results: dict, markdown: str, config: ml_collections.ConfigDict
) -> dict:
    """Write results.json and results.md, both with the command, the config, the machine and
    qjax's version and commit.

    Args:
      workdir: the experiment's workdir.
      results: the experiment's results (JSON-able: numbers, strings, lists, dicts).
      markdown: the results as Markdown tables.
      config: the experiment's config.

    Returns:
      `results` with "command", "config", "machine" and "qjax" (version and commit, see
      `library`) added (what results.json holds).
    """
    command = "python -m " + shlex.join([_module_name(), *sys.argv[1:]])
    results = {
        **results,
        "command": command,
        "config": config.to_dict(),
        "machine": machine(),
        "qjax": library(),
    }
    with open(workdir.file("results.json"), "w") as file:
        json.dump(results, file, indent=1, default=_json_default)
    info, lib = results["machine"], results["qjax"]
    commit = "not a git checkout" if lib["commit"] is None else f"commit {lib['commit']}"
    header = (
        f"Command: `{command}`\n\n"
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, "
        f"JAX {info['jax']} on {', '.join(info['devices'])}\n\n"
        f"qjax {lib['version']}, {commit}{' (with uncommitted changes)' if lib['dirty'] else ''}"
        "\n\n"
    )
    with open(workdir.file("results.md"), "w") as file:
        file.write(header + markdown)
    return results


def _module_name() -> str:
    """The running module as `python -m` names it (the script path when not run with -m)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else (sys.argv[0] if sys.argv else "python")
