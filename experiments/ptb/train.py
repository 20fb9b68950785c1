"""ProxQuant vs straight-through multi-bit LSTMs on Penn Treebank (Bai, Wang & Liberty, §5.2).

The pipeline, composed from qjax calls:

1. float warm start of the one-layer LSTM language model (SGD, gradient-norm clip, learning
   rate divided on validation plateaus, truncated BPTT);
2. for each b in config.bits and each method, from the warm start, at the same budget:
   * `proxquant`: SGD, then `qjax.prox_quant` toward the alternating b-bit quantization, with
     λ_t = λ·epoch and prox strength η_t·λ_t at the current (plateau-decayed) learning rate η_t,
     once for the LSTM and decoder kernels (one set of α per output unit) and once for the
     embedding (one per word): "row-wise" quantization; λ chosen among config.reg_values on the
     validation perplexity;
   * `straight_through`: the loss at the alternating b-bit quantization through
     `qjax.straight_through` (Xu et al. 2018), SGD on the float weights;
3. `qjax.hard_quantize`, the validation perplexity (which chooses λ) and the test perplexity.

Each phase checkpoints per epoch with orbax (workdir/checkpoints/<phase>) and resumes.
Results go to workdir/results.json and workdir/results.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import common
from qjax import data, metrics, prox, transforms
from qjax.models import lstm

METHODS = ("proxquant", "straight_through")
KERNELS = r"(cell/[ih][ifgo]|decoder)/kernel"
EMBEDDING = r"embed/embedding"


class Corpus(NamedTuple):
    train: np.ndarray  # 1-D int32 token ids
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int
    source: str


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
    """PTB through `qjax.data` (or a synthetic Markov-chain corpus for tests)."""
    if config.dataset == "ptb":
        corpus = data.load_ptb(data_dir=config.data_dir or None)
        splits, vocab_size = (corpus.train, corpus.valid, corpus.test), len(corpus.vocab)
        source = corpus.source
    elif config.dataset == "synthetic":
        rng = np.random.default_rng(config.seed)
        vocab_size = 50
        transitions = rng.dirichlet(np.full(vocab_size, 0.1), size=vocab_size)

        def sample(n):
            tokens = np.zeros(n, np.int32)
            for i in range(1, n):
                tokens[i] = rng.choice(vocab_size, p=transitions[tokens[i - 1]])
            return tokens

        splits = (sample(config.train_tokens or 4000), sample(1000), sample(1000))
        source = f"synthetic Markov chain (seed {config.seed})"
    else:
        raise ValueError(f"config.dataset must be 'ptb' or 'synthetic', got {config.dataset!r}")
    train, valid, test = (np.asarray(s, np.int32) for s in splits)
    return Corpus(
        train[: config.train_tokens or None],
        valid[: config.valid_tokens or None],
        test,
        vocab_size,
        source,
    )


def stream_batches(
    streams: np.ndarray, bptt: int
) -> Callable[[int], Iterator[tuple[np.ndarray, np.ndarray, bool]]]:
    """epoch ↦ the epoch's (inputs, targets, first) BPTT windows; `first` resets the LSTM state."""

    def batches(epoch: int):
        del epoch  # the same windows, in order, every epoch
        windows = data.bptt_windows(streams, bptt, drop_remainder=True)
        for i, (inputs, targets) in enumerate(windows):
            yield inputs, targets, i == 0

    return batches


def quantizers_and_masks(bits: int) -> list[tuple[prox.Quantizer, Callable]]:
    """Row-wise b-bit alternating quantization: per output unit for kernels, per word for E."""
    return [
        (prox.multibit_quantizer(bits, channel_axis=-1), transforms.mask_by_path(KERNELS)),
        (prox.multibit_quantizer(bits, channel_axis=0), transforms.mask_by_path(EMBEDDING)),
    ]


def make_optimizer(
    config: ml_collections.ConfigDict,
    pairs: list[tuple[prox.Quantizer, Callable]] = (),
    *,
    steps_per_epoch: int = 1,
    reg: float = 0.0,
) -> optax.GradientTransformation:
    """Gradient-norm clip, SGD at η_t, then (with `pairs`) ProxQuant at strength η_t·λ_t.

    η_t is one injected hyperparameter (`opt_state.hyperparams["learning_rate"]`), divided on
    validation plateaus; the prox strength follows it, as in the authors' code (curr_lr·λ_t).
    λ_t = λ·epoch grows per config.reg_growth ("epoch" or "step").
    """

    def chain(learning_rate):
        reg_schedule = transforms.linear_reg_schedule(
            learning_rate=1.0, reg=reg, steps_per_epoch=steps_per_epoch, growth=config.reg_growth
        )
        links = [
            transforms.prox_quant(
                lambda count: learning_rate * reg_schedule(count), quantizer, mask=mask
            )
            for quantizer, mask in pairs
        ]
        return optax.chain(
            optax.clip_by_global_norm(config.grad_clip), optax.sgd(learning_rate), *links
        )

    return optax.inject_hyperparams(chain)(learning_rate=config.learning_rate)


def straight_through_all(params, pairs):
    """The straight-through parameter map for every (quantizer, mask) pair in turn."""
    for quantizer, mask in pairs:
        params = transforms.straight_through(params, quantizer, mask=mask)
    return params


def hard_quantize_all(params, pairs):
    """`qjax.hard_quantize` for every (quantizer, mask) pair in turn."""
    for quantizer, mask in pairs:
        params = transforms.hard_quantize(params, quantizer, mask=mask)
    return params


def language_model_loss(model, param_map: Callable[[Any], Any] | None = None) -> common.LossFn:
    """Next-token cross-entropy; model_state is the LSTM state carried across BPTT windows."""

    def loss_fn(params, carry, batch, key):
        inputs, targets, first = batch
        carry = jax.tree.map(lambda c: jnp.where(first, jnp.zeros_like(c), c), carry)
        weights = params if param_map is None else param_map(params)
        logits, carry = model.apply(
            {"params": weights}, inputs, carry, train=True, rngs={"dropout": key}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, carry

    return loss_fn


def make_evaluate(model, tokens: np.ndarray, config: ml_collections.ConfigDict):
    """params ↦ perplexity of `tokens` (no dropout, state carried across segments)."""
    streams = data.batchify(tokens, config.eval_batch_size)

    @jax.jit
    def segment_nll(params, inputs, targets, carry):
        logits, carry = model.apply({"params": params}, inputs, carry, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), carry

    def evaluate(params) -> float:
        carry = model.initial_carry(config.eval_batch_size)
        total, count = 0.0, 0
        for inputs, targets in data.bptt_windows(streams, config.bptt):
            nll, carry = segment_nll(params, inputs, targets, carry)
            total += float(nll)
            count += targets.size
        return float(metrics.perplexity(total / count))

    return evaluate


def divide_on_plateau(factor: float) -> Callable[[common.TrainState, dict], common.TrainState]:
    """end_of_epoch: η ← η / factor when the validation perplexity did not improve."""

    def end_of_epoch(state: common.TrainState, history: dict) -> common.TrainState:
        perplexities = history["valid_perplexity"]
        if len(perplexities) < 2 or perplexities[-1] <= min(perplexities[:-1]):
            return state
        hyperparams = state.opt_state.hyperparams
        learning_rate = hyperparams["learning_rate"] / factor
        opt_state = state.opt_state._replace(
            hyperparams={**hyperparams, "learning_rate": learning_rate}
        )
        return state.replace(opt_state=opt_state)

    return end_of_epoch


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> dict:
    """Float warm start, then every (bits, method) at equal budget; returns the results dict.

    Args:
      config: the experiment's config (configs/*.py).
      workdir: checkpoints and results; a rerun resumes from it (same config only).
      on_checkpoint: called as (phase, epoch) after every saved epoch (see `common.Workdir`).

    Returns:
      The results, also written to workdir/results.json and results.md.
    """
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    work = common.open_workdir(config, workdir, on_checkpoint=on_checkpoint)
    corpus = load_corpus(config)
    model = lstm.LSTMLanguageModel(
        vocab_size=corpus.vocab_size,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        dropout_rate=config.dropout_rate,
        tied=config.tied,
    )
    train_streams = data.batchify(corpus.train, config.batch_size)
    quant_streams = data.batchify(
        corpus.train[: config.quant_train_tokens or None], config.batch_size
    )
    steps_per_epoch = (quant_streams.shape[1] - 1) // config.bptt
    if steps_per_epoch == 0:
        raise ValueError(f"too few tokens for batch {config.batch_size}, bptt {config.bptt}")
    valid_perplexity = make_evaluate(model, corpus.valid, config)
    test_perplexity = make_evaluate(model, corpus.test, config)
    params = model.init(
        jax.random.key(config.seed),
        jnp.zeros((1, config.bptt), jnp.int32),
        model.initial_carry(1),
        train=False,
    )["params"]

    def train_phase(name, params, tx, streams, epochs, param_map=None):
        see = (lambda p: p) if param_map is None else jax.jit(param_map)
        return common.run_phase(
            work,
            name,
            common.TrainState.create(
                params,
                tx,
                key=common.phase_key(config.seed, name),
                model_state=model.initial_carry(config.batch_size),
            ),
            common.make_train_step(language_model_loss(model, param_map), tx),
            stream_batches(streams, config.bptt),
            epochs=epochs,
            evaluate=lambda s: {
                "valid_perplexity": valid_perplexity(see(s.params)),
                "learning_rate": float(s.opt_state.hyperparams["learning_rate"]),
            },
            end_of_epoch=divide_on_plateau(config.lr_plateau_factor),
        )

    state, float_history = train_phase(
        "float", params, make_optimizer(config), train_streams, config.warm_epochs
    )
    warm_params = state.params
    results = {
        "data_source": corpus.source,
        "steps_per_epoch": steps_per_epoch,
        "float": {"test_perplexity": test_perplexity(warm_params), "history": float_history},
        "quantized": {},
    }
    logging.info("float: test perplexity %.2f", results["float"]["test_perplexity"])

    for bits in config.bits:
        pairs = quantizers_and_masks(bits)
        for method in config.methods:
            regs = tuple(config.reg_values) if method == "proxquant" else (None,)
            runs = []
            for reg in regs:
                name = f"{method}_{bits}bit" + ("" if reg is None else f"_reg{reg:g}")
                if method == "proxquant":
                    tx = make_optimizer(config, pairs, steps_per_epoch=steps_per_epoch, reg=reg)
                    param_map = None
                else:
                    tx = make_optimizer(config)
                    param_map = functools.partial(straight_through_all, pairs=pairs)
                state, history = train_phase(
                    name, warm_params, tx, quant_streams, config.quant_epochs, param_map
                )
                hard = jax.jit(functools.partial(hard_quantize_all, pairs=pairs))(state.params)
                runs.append(
                    {
                        "bits": bits,
                        "method": method,
                        "reg": reg,
                        "valid_perplexity": valid_perplexity(hard),
                        "test_perplexity": test_perplexity(hard),
                        "sign_change": float(
                            metrics.sign_change_fraction(
                                state.params, warm_params, mask=pairs[0][1]
                            )
                        ),
                        "history": history,
                    }
                )
                logging.info(
                    "%s: validation perplexity %.2f, test %.2f",
                    name,
                    runs[-1]["valid_perplexity"],
                    runs[-1]["test_perplexity"],
                )
            chosen = min(runs, key=lambda r: r["valid_perplexity"])  # ties: the first λ
            results["quantized"][f"{method}_{bits}bit"] = {
                **chosen,
                "reg_choice": "validation" if len(runs) > 1 else "fixed",
                "reg_candidates": [
                    {k: r[k] for k in ("reg", "valid_perplexity", "test_perplexity")} for r in runs
                ],
            }

    return common.write_results(work, results, results_table(results), config)


def results_table(results: dict) -> str:
    """Markdown table: test perplexity of the hard-quantized model by bits and method."""
    rows = results["quantized"].values()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bits = sorted({r["bits"] for r in rows})
    lines = [
        "Test perplexity of the hard-quantized model; ProxQuant's λ (in brackets) chosen on the "
        "validation perplexity when several were tried (else fixed).",
        "",
        "| method | " + " | ".join(f"{b}-bit" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
        f"| float (warm start) | {results['float']['test_perplexity']:.1f}" + " |" * len(bits),
    ]
    for method in methods:
        cells = []
        for b in bits:
            r = results["quantized"][f"{method}_{b}bit"]
            reg = "" if r["reg"] is None else f" (λ={r['reg']:g}, {r['reg_choice']})"
            cells.append(f"{r['test_perplexity']:.1f}{reg}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
