"""A decoder-only transformer language model in Flax NNX, with perplexity and sampling.

GPT-style: token + learned position embeddings → `num_layers` pre-LayerNorm blocks → final
LayerNorm → logits, through the transposed token embedding (`tied_head=True`) or a separate
`head` (an `nnx.Linear` without bias). Each block is

    x = x + dropout(attention(norm(x)))      causal `nnx.MultiHeadAttention`
    x = x + dropout(mlp_out(gelu(mlp_in(norm(x)))))

The attention's projections are `nnx.LinearGeneral` with head axes: `query`, `key`, `value`
kernels (d_model, heads, head_dim), `out` kernel (heads, head_dim, d_model); the MLP layers are
`nnx.Linear`. With `scan_layers=True` the blocks are one module whose parameters carry a leading
layer axis (made by `nnx.vmap`, applied by `nnx.scan`: one traced block however deep the model);
else `blocks` is a list of modules. Both compute the same function of the same weights.

Dropout (on attention weights and on both residual branches) draws from the 'dropout' stream of
the `nnx.Rngs` the model was built with; `nnx.view(model, deterministic=True)` (or
`model.eval()`) turns it off. `perplexity` and `generate` do so themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike
from tqdm import tqdm

from qjax import metrics
from qjax.data import text

__all__ = ["TransformerConfig", "TransformerLM", "generate", "perplexity"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a `TransformerLM`.

    Attributes:
      vocab_size: number of tokens.
      max_len: the longest sequence (the number of learned positions).
      num_layers: transformer blocks.
      num_heads: attention heads; must divide d_model.
      d_model: residual width.
      mlp_dim: hidden width of the MLPs (4·d_model is usual).
      dropout_rate: dropout on attention weights and on both residual branches.
      tied_head: logits through the transposed token embedding instead of a separate head.
      scan_layers: stack the blocks on a leading axis and apply them with `nnx.scan`.
    """

    vocab_size: int
    max_len: int
    num_layers: int = 2
    num_heads: int = 4
    d_model: int = 128
    mlp_dim: int = 512
    dropout_rate: float = 0.1
    tied_head: bool = True
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "num_layers", "num_heads", "d_model", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")


def _init(config: TransformerConfig, *, residual: bool = False) -> nnx.Initializer:
    """GPT-2's initialization: N(0, 0.02²), scaled by 1/√(2·layers) on the residual outputs."""
    std = 0.02 / math.sqrt(2 * config.num_layers) if residual else 0.02
    return nnx.initializers.normal(std)


class Block(nnx.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=d,
            dropout_rate=config.dropout_rate,
            deterministic=False,
            decode=False,
            kernel_init=_init(config),
            out_kernel_init=_init(config, residual=True),
            rngs=rngs,
        )
        self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, config.mlp_dim, kernel_init=_init(config), rngs=rngs)
        self.mlp_out = nnx.Linear(
            config.mlp_dim, d, kernel_init=_init(config, residual=True), rngs=rngs
        )
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """(batch, time, d_model) → same shape; `mask` (…, time, time) True where attended."""
        x = x + self.dropout(self.attention(self.attention_norm(x), mask=mask))
        return x + self.dropout(self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x)))))


def check_tokens(tokens: jax.Array, max_len: int, *, limit: str) -> int:
    """Checks the shape and dtype of a language model's input (static: fine under jit).

    Args:
      tokens: (batch, time) integer token ids.
      max_len: the longest time the model accepts.
      limit: the name of that limit in the error ("the model's max_len").

    Returns:
      time.

    Raises:
      ValueError: tokens that are not (batch, time) integers, or longer than max_len.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be integer ids of shape (batch, time), got {tokens.dtype} {tokens.shape}"
        )
    length = tokens.shape[1]
    if length > max_len:
        raise ValueError(f"sequence length {length} exceeds {limit} {max_len}")
    return length


class TransformerLM(nnx.Module):
    """Decoder-only transformer language model: token ids → next-token logits.

    Submodules: `embed` (nnx.Embed, vocab × d_model), `position` (nnx.Embed, max_len × d_model),
    `blocks` (a list of `Block`, or one stacked `Block` when `config.scan_layers`), `final_norm`,
    and `head` (nnx.Linear, d_model → vocab) unless `config.tied_head`.

    Args:
      config: the sizes and options.
      rngs: its 'params' stream initializes the weights; its 'dropout' stream (else 'default')
        seeds the dropout streams that the model keeps (`nnx.reseed(model, dropout=key)`
        redraws them).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model, embedding_init=_init(config), rngs=rngs
        )
        self.position = nnx.Embed(
            config.max_len, config.d_model, embedding_init=_init(config), rngs=rngs
        )
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        if config.scan_layers:

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> Block:
                return Block(config, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = (
            None
            if config.tied_head
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                kernel_init=_init(config),
                rngs=rngs,
            )
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: (batch, time) integer token ids, time ≤ config.max_len. Ids are not checked
            here (they may be traced); `perplexity` and the `qjax.data.text` helpers check them.

        Returns:
          (batch, time, vocab_size) float32 logits; position t sees tokens 0..t only.
        """
        length = check_tokens(tokens, self.config.max_len, limit="the model's max_len")
        x = self.embed(tokens) + self.position(jnp.arange(length))
        x = self.dropout(x)
        mask = nnx.make_causal_mask(tokens, dtype=jnp.bool_)
        if self.config.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
            def through(x, block, mask):
                return block(x, mask)

            x = through(x, self.blocks, mask)
        else:
            for block in self.blocks:
                x = block(x, mask)
        x = self.final_norm(x)
        return self.embed.attend(x) if self.head is None else self.head(x)


def _deterministic(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """The model without dropout (a view: `model` itself is unchanged), split for `jax.jit`."""
    return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


@functools.partial(jax.jit, static_argnums=0)
def _weighted_nll(graphdef: nnx.GraphDef, state: nnx.State, windows, weights) -> jax.Array:
    logits = nnx.merge(graphdef, state)(windows[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    return jnp.sum(nll * weights)


def perplexity(model: nnx.Module, tokens: ArrayLike, *, batch_size: int, seq_len: int) -> float:
    """Perplexity of a token stream: exp of the mean next-token NLL over all its tokens.

    The stream is cut into windows of `seq_len` predictions (`qjax.data.eval_windows`): every
    token but the first is scored exactly once, with the context of its window. Dropout is off.

    Args:
      model: any NNX module mapping (batch, seq_len) int32 ids to (batch, seq_len, vocab) logits.
      tokens: (n,) token ids, e.g. a split of a `qjax.data.TextCorpus`.
      batch_size: windows per forward pass (the last batch is padded with zero-weight windows).
      seq_len: predictions per window; at most the model's maximal length.

    Returns:
      The perplexity (a Python float).

    Raises:
      ValueError: ids outside the model's vocabulary, a stream shorter than seq_len + 1, or a
        non-positive batch size.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    windows, weights = text.eval_windows(tokens, seq_len=seq_len)
    graphdef, state = _deterministic(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, windows[:1, :-1])
    windows = text.check_ids(windows, logits.shape[-1], what="tokens")
    pad = -len(windows) % batch_size
    windows = np.pad(windows, ((0, pad), (0, 0)))
    weights = np.pad(weights, ((0, pad), (0, 0)))
    total = jnp.zeros((), jnp.float32)
    starts = range(0, len(windows), batch_size)
    for start in tqdm(starts, desc="perplexity", disable=None, leave=False):
        stop = start + batch_size
        total = total + _weighted_nll(graphdef, state, windows[start:stop], weights[start:stop])
    return float(metrics.perplexity(total / weights.sum()))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _sample(graphdef, state, buffer, length, num_tokens, temperature, key) -> jax.Array:
    max_len = buffer.shape[1]

    def step(carry, key):
        buffer, length = carry
        logits = nnx.merge(graphdef, state)(buffer)
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
        if temperature == 0.0:
            token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(key, last / temperature).astype(jnp.int32)
        buffer = jnp.where(length == max_len, jnp.roll(buffer, -1, axis=1), buffer)
        buffer = buffer.at[:, jnp.minimum(length, max_len - 1)].set(token)
        return (buffer, jnp.minimum(length + 1, max_len)), token

    _, tokens = jax.lax.scan(step, (buffer, length), jax.random.split(key, num_tokens))
    return tokens.T


def generate(
    model: TransformerLM,
    prompt: ArrayLike,
    *,
    num_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """Continues token sequences by sampling from the model, one token at a time.

    The context is the last `config.max_len` tokens (prompt and samples so far); each step runs
    the model over a fixed (batch, max_len) buffer, so one program serves every step.

    Args:
      model: the `TransformerLM` (dropout is off while sampling).
      prompt: (batch, p) token ids, p ≥ 1; only the last max_len are used.
      num_tokens: tokens to generate.
      key: PRNG key.
      temperature: softmax temperature; 0 takes the most likely token (greedy).

    Returns:
      (batch, num_tokens) int32 generated ids (without the prompt).
    """
    prompt = text.check_ids(prompt, model.config.vocab_size, what="prompt")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape (batch, p) with p ≥ 1, got {prompt.shape}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    max_len = model.config.max_len
    prompt = prompt[:, -max_len:]
    buffer = np.zeros((len(prompt), max_len), np.int32)
    buffer[:, : prompt.shape[1]] = prompt
    graphdef, state = _deterministic(model)
    return _sample(graphdef, state, buffer, prompt.shape[1], num_tokens, float(temperature), key)
