"""ProxQuant vs straight-through multi-bit LSTMs on Penn Treebank (Bai, Wang & Liberty, §5.2).

The pipeline, composed from qjax calls:

1. float warm start of the one-layer LSTM language model (SGD, gradient-norm clip, learning
   rate divided on validation plateaus, truncated BPTT);
2. for each b in config.bits and each method, from the warm start, at the same budget:
   * `proxquant`: SGD, then `qjax.prox_quant` toward the alternating b-bit quantization, with
     λ_t = λ·epoch (prox strength η·λ_t), once for the LSTM and decoder kernels (one set of
     α per output unit) and once for the embedding (one per word): "row-wise" quantization;
   * `straight_through`: the loss at the alternating b-bit quantization through
     `qjax.straight_through` (Xu et al. 2018), SGD on the float weights;
3. `qjax.hard_quantize` and the test perplexity of the quantized model.

Each phase checkpoints per epoch with orbax (workdir/checkpoints/<phase>) and resumes.
Results go to workdir/results.json and workdir/results.md.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from experiments.proxquant.checkpointing import PhaseCheckpoints, write_json
from qjax import metrics, prox, transforms
from qjax.models import lstm

METHODS = ("proxquant", "straight_through")
KERNELS = r"(cell/[ih][ifgo]|decoder)/kernel"
EMBEDDING = r"embed/embedding"


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Corpus(NamedTuple):
    train: np.ndarray  # 1-D int32 token ids
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
    """PTB through `qjax.data` (or a synthetic Markov-chain corpus for tests)."""
    if config.dataset == "ptb":
        from qjax import data

        corpus = data.load_ptb(data_dir=config.data_dir or None)
        logging.info("PTB from %s", corpus.source)
        splits, vocab_size = (corpus.train, corpus.valid, corpus.test), len(corpus.vocab)
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
    else:
        raise ValueError(f"config.dataset must be 'ptb' or 'synthetic', got {config.dataset!r}")
    train, valid, test = (np.asarray(s, np.int32) for s in splits)
    return Corpus(
        train[: config.train_tokens or None], valid[: config.valid_tokens or None], test, vocab_size
    )


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Cut a token stream into `batch_size` parallel streams, shape (batch_size, length)."""
    length = len(tokens) // batch_size
    if length < 2:
        raise ValueError(f"{len(tokens)} tokens are too few for batch size {batch_size}")
    return tokens[: length * batch_size].reshape(batch_size, length)


def segments(streams: np.ndarray, bptt: int):
    """Consecutive (inputs, targets) windows of `bptt` steps (targets shifted by one)."""
    for start in range(0, streams.shape[1] - 1 - bptt + 1, bptt):
        yield streams[:, start : start + bptt], streams[:, start + 1 : start + 1 + bptt]


def quantizers_and_masks(bits: int) -> list[tuple[prox.Quantizer, Callable]]:
    """Row-wise b-bit alternating quantization: per output unit for kernels, per word for E."""
    return [
        (prox.multibit_quantizer(bits, channel_axis=-1), transforms.mask_by_path(KERNELS)),
        (prox.multibit_quantizer(bits, channel_axis=0), transforms.mask_by_path(EMBEDDING)),
    ]


def make_optimizer(
    config: ml_collections.ConfigDict, links: list[optax.GradientTransformation]
) -> optax.GradientTransformation:
    """Gradient-norm clip, SGD with an adjustable learning rate, then the given last links."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate),
        *links,
    )


def make_train_step(model, tx, param_map=lambda params: params):
    @jax.jit
    def train_step(state: TrainState, inputs, targets, carry, key):
        def loss_fn(params):
            logits, carry_out = model.apply(
                {"params": param_map(params)}, inputs, carry, train=True, rngs={"dropout": key}
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return loss, carry_out

        (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), carry, loss

    return train_step


def make_evaluate(model, tokens: np.ndarray, config: ml_collections.ConfigDict):
    """params ↦ perplexity of `tokens` (no dropout, state carried across segments)."""
    streams = batchify(tokens, config.eval_batch_size)

    @jax.jit
    def segment_nll(params, inputs, targets, carry):
        logits, carry = model.apply({"params": params}, inputs, carry, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), carry

    def evaluate(params) -> float:
        carry = model.initial_carry(config.eval_batch_size)
        total, count = 0.0, 0
        for inputs, targets in segments(streams, config.bptt):
            nll, carry = segment_nll(params, inputs, targets, carry)
            total += float(nll)
            count += targets.size
        return float(metrics.perplexity(total / count))

    return evaluate


def run_phase(
    name: str,
    state: TrainState,
    train_step,
    epochs: int,
    model,
    train_streams: np.ndarray,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    valid_perplexity: Callable[[Any], float],
) -> tuple[TrainState, dict]:
    """Train for `epochs` with truncated BPTT, dividing the learning rate on plateaus."""
    checkpoints = PhaseCheckpoints(os.path.join(workdir, "checkpoints", name))
    history = {"epoch": [], "loss": [], "valid_perplexity": [], "learning_rate": []}
    start_epoch = 0
    if checkpoints.latest_epoch() is not None:
        state, history, start_epoch = checkpoints.restore(state)
        logging.info("%s: resumed after epoch %d", name, start_epoch)
    key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
    n_segments = (train_streams.shape[1] - 1) // config.bptt
    progress = tqdm(total=(epochs - start_epoch) * n_segments, desc=name, disable=None)
    for epoch in range(start_epoch, epochs):
        carry = model.initial_carry(config.batch_size)
        losses = []
        for i, (inputs, targets) in enumerate(segments(train_streams, config.bptt)):
            step_key = jax.random.fold_in(key, epoch * n_segments + i)
            state, carry, loss = train_step(state, inputs, targets, carry, step_key)
            losses.append(loss)
            progress.update()
        perplexity = valid_perplexity(state.params)
        sgd_state = state.opt_state[1]
        learning_rate = float(sgd_state.hyperparams["learning_rate"])
        if history["valid_perplexity"] and perplexity > min(history["valid_perplexity"]):
            sgd_state.hyperparams["learning_rate"] = jnp.asarray(
                learning_rate / config.lr_plateau_factor
            )
        history["epoch"].append(epoch + 1)
        history["loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["valid_perplexity"].append(perplexity)
        history["learning_rate"].append(learning_rate)
        logging.info(
            "%s epoch %d: train loss %.4f, valid perplexity %.2f (lr %.3g)",
            name,
            epoch + 1,
            history["loss"][-1],
            perplexity,
            learning_rate,
        )
        checkpoints.save(epoch + 1, state, history)
    progress.close()
    return state, history


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Float warm start, then every (bits, method) at equal budget; returns the results dict."""
    os.makedirs(workdir, exist_ok=True)
    corpus = load_corpus(config)
    model = lstm.LSTMLanguageModel(
        vocab_size=corpus.vocab_size,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        dropout_rate=config.dropout_rate,
        tied=config.tied,
    )
    train_streams = batchify(corpus.train, config.batch_size)
    quant_streams = batchify(corpus.train[: config.quant_train_tokens or None], config.batch_size)
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

    float_tx = make_optimizer(config, [])
    state, float_history = run_phase(
        "float",
        TrainState(params, float_tx.init(params)),
        make_train_step(model, float_tx),
        config.warm_epochs,
        model,
        train_streams,
        config,
        workdir,
        valid_perplexity=valid_perplexity,
    )
    warm_params = state.params
    results = {
        "config": config.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "float": {"test_perplexity": test_perplexity(warm_params), "history": float_history},
        "quantized": {},
    }
    logging.info("float: test perplexity %.2f", results["float"]["test_perplexity"])

    for bits in config.bits:
        pairs = quantizers_and_masks(bits)
        for method in config.methods:
            if method == "proxquant":
                strength = transforms.linear_reg_schedule(
                    learning_rate=config.learning_rate,
                    reg=config.reg,
                    steps_per_epoch=steps_per_epoch,
                )
                links = [transforms.prox_quant(strength, q, mask=m) for q, m in pairs]
                param_map = lambda params: params
            elif method == "straight_through":
                links = []

                def param_map(params, pairs=pairs):
                    for quantizer, mask in pairs:
                        params = transforms.straight_through(params, quantizer, mask=mask)
                    return params
            else:
                raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
            tx = make_optimizer(config, links)
            name = f"{method}_{bits}bit"
            state, history = run_phase(
                name,
                TrainState(warm_params, tx.init(warm_params)),
                make_train_step(model, tx, param_map),
                config.quant_epochs,
                model,
                quant_streams,
                config,
                workdir,
                valid_perplexity=lambda p, pm=param_map: valid_perplexity(pm(p)),
            )
            hard = state.params
            for quantizer, mask in pairs:
                hard = transforms.hard_quantize(hard, quantizer, mask=mask)
            results["quantized"][name] = {
                "bits": bits,
                "method": method,
                "test_perplexity": test_perplexity(hard),
                "sign_change": float(
                    metrics.sign_change_fraction(state.params, warm_params, mask=pairs[0][1])
                ),
                "history": history,
            }
            logging.info(
                "%s: test perplexity %.2f", name, results["quantized"][name]["test_perplexity"]
            )

    write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as file:
        file.write(results_table(results))
    return results


def results_table(results: dict) -> str:
    """Markdown table: test perplexity of the hard-quantized model by bits and method."""
    methods = list(dict.fromkeys(r["method"] for r in results["quantized"].values()))
    bits = sorted({r["bits"] for r in results["quantized"].values()})
    lines = [
        "| method | " + " | ".join(f"{b}-bit" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
        f"| float (warm start) | {results['float']['test_perplexity']:.1f}" + " |" * len(bits),
    ]
    for method in methods:
        cells = [f"{results['quantized'][f'{method}_{b}bit']['test_perplexity']:.1f}" for b in bits]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
