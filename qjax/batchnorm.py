"""Re-estimate BatchNorm statistics after the weights change (e.g. after hard quantization).

The running averages a network collected with float weights no longer describe the activations
of its quantized version. `reestimate_batch_stats` runs the network in training mode over some
batches and replaces every `flax.linen.BatchNorm`'s running mean and variance by the average of
the per-batch statistics (an equal-weight average, not the training-time exponential one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

__all__ = ["batch_statistics", "reestimate_batch_stats"]

_COLLECTION = "batchnorm_estimates"


def _record_batch_statistics(next_fun, args, kwargs, context):
    """Interceptor: sow the mean and variance of each BatchNorm's input, then run it."""
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
        x = args[0]
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        feature_axes = {a % x.ndim for a in axes}
        reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
        x32 = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x32, axis=reduce_axes)
        var = jnp.mean(jnp.square(x32), axis=reduce_axes) - jnp.square(mean)
        module.sow(_COLLECTION, "mean", mean, reduce_fn=lambda _, v: v, init_fn=lambda: 0)
        module.sow(_COLLECTION, "var", var, reduce_fn=lambda _, v: v, init_fn=lambda: 0)
    return next_fun(*args, **kwargs)


def batch_statistics(apply_fn: Callable[..., Any], variables: Any, batch: Any) -> Any:
    """Per-batch mean and variance of every BatchNorm input in one training-mode forward pass.

    Args:
      apply_fn: runs the model in training mode, called as apply_fn(variables, batch,
        mutable=[...]) and returning (output, mutated variables), e.g.
        `lambda v, x, **kw: model.apply(v, x, train=True, **kw)`. In training mode every
        BatchNorm normalizes with the batch's own statistics, as during training.
      variables: {'params': ..., 'batch_stats': ...}.
      batch: the model's input (any pytree apply_fn takes).

    Returns:
      A pytree with the structure of variables['batch_stats'] ({'mean', 'var'} per BatchNorm).
    """
    with nn.intercept_methods(_record_batch_statistics):
        _, state = apply_fn(variables, batch, mutable=["batch_stats", _COLLECTION])
    return state[_COLLECTION]


def reestimate_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Any,
    batches: Iterable[Any],
    *,
    progress: bool = False,
) -> Any:
    """Replace every BatchNorm's running statistics by their average over `batches`.

    Args:
      apply_fn: the model in training mode (see `batch_statistics`).
      variables: {'params': ..., 'batch_stats': ...} with the (quantized) weights.
      batches: an iterable of model inputs.
      progress: show a tqdm progress bar.

    Returns:
      `variables` with 'batch_stats' replaced: mean = average of the batch means, var = average
      of the (biased) batch variances.
    """
    if "batch_stats" not in variables:
        raise ValueError("variables has no 'batch_stats' collection: the model has no BatchNorm")
    compute = jax.jit(lambda v, batch: batch_statistics(apply_fn, v, batch))
    total, count = None, 0
    for batch in tqdm(batches, desc="BatchNorm re-estimation", disable=not progress):
        stats = compute(variables, batch)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
    if count == 0:
        raise ValueError("batches is empty: need at least one batch to estimate statistics")
    estimate = jax.tree.map(lambda s: s / count, total)
    old = variables["batch_stats"]
    try:
        merged = jax.tree.map(lambda o, n: n.astype(o.dtype), old, estimate)
    except ValueError as error:
        raise ValueError(f"apply_fn's BatchNorm layers do not match batch_stats: {error}") from None
    return {**variables, "batch_stats": merged}
