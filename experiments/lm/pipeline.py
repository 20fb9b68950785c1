"""A transformer language model for post-training quantization: train it, measure perplexity.

The float half of the experiment "GPFQ on a transformer language model, against GPTQ, RTN and
qwix": `run(config, workdir)`

1. loads the corpus (`load_corpus`: word-level Penn Treebank, or a character corpus such as the
   one shipped with qjax);
2. trains `qjax.models.TransformerLM` (`train`) with AdamW (warmup then cosine decay, no weight
   decay on biases and LayerNorm), gradient-norm clipping and dropout, through the shared loop
   of `experiments.common` (an orbax checkpoint per epoch, exact resume, NaN stop); an epoch is
   one pass over the training split in shuffled windows of seq_len + 1 tokens, the windows'
   boundaries shifted by a random offset each epoch;
3. saves the float parameters (`<workdir>/float_model`, see `restore_float_model`) and writes
   `results.json` / `results.md`: float validation and test perplexity (exp of the mean token
   NLL over the whole split, `qjax.models.transformer.perplexity`), training and evaluation
   tokens/s, the command, the config and the machine.

The quantization sweep calls `restore_float_model` (or `train`, which resumes from the last
checkpoint without training again), `qjax.data.calibration_batches` for calibration inputs and
`qjax.models.transformer.perplexity` for the quantized models.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from experiments import common
from qjax import data, transforms
from qjax.models import TransformerConfig, TransformerLM, transformer

# Weight decay applies to the kernels and the embedding tables, not to biases and LayerNorm
# (an NNX leaf's path may end in "/value").
DECAYED = r"(.*/)?(kernel|embedding)(/value)?"
FLOAT_MODEL = "float_model"


def load_corpus(config: ml_collections.ConfigDict) -> data.TextCorpus:
    """The corpus of `config.dataset`: "ptb" (from `config.data_dir`) or "chars".

    "chars" reads `config.text_file` as a character corpus; an empty `text_file` is the English
    corpus shipped with qjax, so the pipeline runs without any data folder.
    """
    if config.dataset == "ptb":
        return data.load_ptb(data_dir=config.data_dir or None)
    if config.dataset == "chars":
        return data.load_char_corpus(config.text_file or None)
    raise ValueError(f"config.dataset must be 'ptb' or 'chars', got {config.dataset!r}")


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerLM:
    """A fresh `TransformerLM` of `config.model`'s sizes, max_len = config.seq_len.

    Parameters and dropout streams are seeded from config.seed.
    """
    model_config = TransformerConfig(vocab_size=vocab_size, max_len=config.seq_len, **config.model)
    return TransformerLM(model_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_tokens: int) -> int:
    """Optimizer steps in one pass over the training split (the last partial batch dropped)."""
    windows = (num_train_tokens - config.seq_len) // config.seq_len  # after an offset < seq_len
    steps = windows // config.batch_size
    if steps < 1:
        raise ValueError(
            f"{num_train_tokens} training tokens are too few for a batch of {config.batch_size} "
            f"windows of {config.seq_len} + 1 tokens"
        )
    return steps


def train_batches(
    tokens: np.ndarray, epoch: int, config: ml_collections.ConfigDict
) -> list[np.ndarray]:
    """One epoch's batches: the stream from a random offset, cut into windows, shuffled.

    A function of (config.seed, epoch) alone, so that a resumed run sees the same batches.

    Returns:
      `steps_per_epoch` arrays (batch_size, seq_len + 1) int32.
    """
    offset = int(np.random.default_rng([config.seed, epoch, 1]).integers(config.seq_len))
    windows_in_epoch = (len(tokens) - config.seq_len) // config.seq_len
    stream = tokens[offset : offset + windows_in_epoch * config.seq_len + 1]
    windows, _ = data.eval_windows(stream, seq_len=config.seq_len)
    order = common.epoch_order(config.seed, epoch, len(windows))
    size = config.batch_size
    return [
        windows[order[i * size : (i + 1) * size]]
        for i in range(steps_per_epoch(config, len(tokens)))
    ]


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Gradient-norm clipping, then AdamW with linear warmup and cosine decay to 10 % of peak."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, config.warmup_steps + 1),
        end_value=0.1 * config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=config.weight_decay,
            mask=transforms.mask_by_path(DECAYED),
        ),
    )


def lm_loss(graphdef: nnx.GraphDef, rest: nnx.State) -> common.LossFn:
    """The mean next-token cross-entropy of the model, with dropout keyed by the step's key.

    Args:
      graphdef, rest: the model's structure and non-parameter state (its dropout streams), from
        `nnx.split(model, nnx.Param, ...)`.

    Returns:
      `loss_fn(params, model_state, windows, key) -> (loss, model_state)` for
      `common.make_train_step`; windows are (batch, seq_len + 1) int32.
    """

    def loss_fn(params, model_state, windows, key):
        # A copy of `rest` made inside the trace, so that reseeding may write to it.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        nnx.reseed(model, policy="match_shape", dropout=key)
        logits = model(windows[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
        return loss, model_state

    return loss_fn


def timed_perplexity(
    model: nnx.Module, tokens: np.ndarray, config: ml_collections.ConfigDict
) -> tuple[float, float]:
    """(perplexity, tokens scored per second) of a split, in eval mode."""
    start = time.perf_counter()
    value = transformer.perplexity(
        model, tokens, batch_size=config.eval_batch_size, seq_len=config.seq_len
    )
    return value, (len(tokens) - 1) / (time.perf_counter() - start)


def train_model(
    config: ml_collections.ConfigDict,
    workdir: common.Workdir,
    corpus: data.TextCorpus,
    model: nnx.Module,
    loss: Callable[[nnx.GraphDef, nnx.State], common.LossFn],
    *,
    steps: int,
    perplexity: Callable[[nnx.Module, np.ndarray, ml_collections.ConfigDict], float],
) -> tuple[nnx.Module, dict]:
    """Trains an NNX language model for config.epochs (resuming from the workdir's checkpoints).

    The loop both language-model experiments share: `make_optimizer` over steps × epochs,
    `train_batches` cut to `steps` per epoch, the validation perplexity and the epoch's training
    time after each epoch, `common.run_phase`'s checkpoints.

    Args:
      config: the experiment config (seed, epochs, batch_size, seq_len, optimizer fields).
      workdir: from `common.open_workdir`.
      corpus: from `load_corpus`.
      model: the fresh model, split into `nnx.Param` and the rest.
      loss: (graphdef, rest) ↦ the loss function of `common.make_train_step`.
      steps: optimizer steps per epoch (at most `steps_per_epoch(config, len(corpus.train))`).
      perplexity: (model, tokens, config) ↦ the perplexity of a split.

    Returns:
      (the trained model, the phase history by epoch: train_loss, valid_perplexity,
      train_seconds (the epoch's steps, without evaluation; the first one compiles) and
      train_tokens_per_s).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config, steps * config.epochs)
    state = common.TrainState.create(params, tx, key=common.phase_key(config.seed, "float"))
    tokens_per_epoch = steps * config.batch_size * config.seq_len
    clock = {"last": time.perf_counter()}

    def evaluate(state: common.TrainState) -> dict[str, float]:
        train_seconds = time.perf_counter() - clock["last"]
        valid = perplexity(nnx.merge(graphdef, state.params, rest), corpus.valid, config)
        clock["last"] = time.perf_counter()
        return {
            "valid_perplexity": valid,
            "train_seconds": train_seconds,
            "train_tokens_per_s": tokens_per_epoch / train_seconds,
        }

    logging.info(
        "training %d parameters, %d steps per epoch of %d tokens",
        sum(p.size for p in jax.tree.leaves(params)),
        steps,
        tokens_per_epoch,
    )
    state, history = common.run_phase(
        workdir,
        "float",
        state,
        common.make_train_step(loss(graphdef, rest), tx),
        lambda epoch: train_batches(corpus.train, epoch, config)[:steps],
        epochs=config.epochs,
        evaluate=evaluate,
    )
    return nnx.merge(graphdef, state.params, rest), history


def train(
    config: ml_collections.ConfigDict, workdir: common.Workdir, corpus: data.TextCorpus
) -> tuple[TransformerLM, dict]:
    """Trains the float `TransformerLM` for config.epochs (resuming from the workdir's
    checkpoints), with dropout, a full pass over the training split per epoch.

    Returns:
      (the trained model, the phase history of `train_model`).
    """
    return train_model(
        config,
        workdir,
        corpus,
        make_model(config, len(corpus.vocab)),
        lm_loss,
        steps=steps_per_epoch(config, len(corpus.train)),
        perplexity=lambda m, tokens, c: timed_perplexity(m, tokens, c)[0],
    )


def save_float_model(model: TransformerLM, workdir: common.Workdir) -> None:
    """Saves the model's parameters to `<workdir>/float_model` (orbax, replacing any)."""
    with common.quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(workdir.file(FLOAT_MODEL), nnx.state(model, nnx.Param), force=True)


def restore_float_model(
    config: ml_collections.ConfigDict, workdir: str, *, vocab_size: int
) -> TransformerLM:
    """The float model that `run(config, workdir)` trained and saved.

    Args:
      config: the experiment config of that run (its sizes rebuild the model).
      workdir: the run's workdir.
      vocab_size: the corpus's vocabulary size (`len(load_corpus(config).vocab)`).

    Returns:
      The `TransformerLM` with the saved parameters (in training mode, as built).
    """
    model = make_model(config, vocab_size)
    with common.quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(
            os.path.join(os.path.abspath(workdir), FLOAT_MODEL), nnx.state(model, nnx.Param)
        )
    nnx.update(model, params)
    return model


def float_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config without its quantization settings (`ptq`): what the float model depends on,
    so that the training workdir's fingerprint ignores them."""
    fields = config.to_dict()
    fields.pop("ptq", None)
    return ml_collections.ConfigDict(fields)


def results_markdown(results: dict) -> str:
    """The float model's perplexities and speeds as a Markdown table."""
    f = results["float"]
    return (
        "| model | parameters | valid perplexity | test perplexity | train tokens/s "
        "| eval tokens/s |\n|---|---|---|---|---|---|\n"
        f"| float | {results['num_params']:,} | {f['valid_perplexity']:.2f} "
        f"| {f['test_perplexity']:.2f} | {results['train_tokens_per_s']:,.0f} "
        f"| {f['eval_tokens_per_s']:,.0f} |\n"
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the float model, saves it, evaluates it and writes the results.

    Args:
      config: the experiment config (see `experiments/lm/configs`).
      workdir: checkpoints, `float_model`, `results.json` and `results.md` go here.

    Returns:
      The results dict written to results.json.
    """
    work = common.open_workdir(float_config(config), workdir)
    corpus = load_corpus(config)
    model, history = train(config, work, corpus)
    save_float_model(model, work)
    valid, _ = timed_perplexity(model, corpus.valid, config)
    test, eval_speed = timed_perplexity(model, corpus.test, config)  # compiled by now: timed
    logging.info("float: valid perplexity %.2f, test perplexity %.2f", valid, test)
    results = {
        "corpus": {
            "source": corpus.source,
            "vocab_size": len(corpus.vocab),
            "tokens": {
                "train": len(corpus.train),
                "valid": len(corpus.valid),
                "test": len(corpus.test),
            },
        },
        "num_params": sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "train_seconds": float(np.sum(history["train_seconds"])),
        "train_tokens_per_s": float(np.median(history["train_tokens_per_s"])),
        "float": {
            "valid_perplexity": valid,
            "test_perplexity": test,
            "eval_tokens_per_s": eval_speed,
        },
        "history": history,
    }
    return common.write_results(work, results, results_markdown(results), config)
