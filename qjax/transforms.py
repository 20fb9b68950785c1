"""ProxQuant and BinaryConnect as optax building blocks.

ProxQuant ("eager" prox) takes any optimizer's step and then applies the prox of the
quantization regularizer:

    θ_{t+1} = prox_{η_t λ_t R}(θ_t + u_t),      u_t the optimizer's update (e.g. −η_t·Adam(∇L)).

`prox_quant` is that prox as the last link of an `optax.chain`; it needs `params` and returns
updates with params + updates = prox(params + incoming updates). BinaryConnect ("lazy"
projection) instead evaluates the loss at q(θ) and applies the gradient to θ, which in JAX is a
parameter map inside the loss, θ + stop_gradient(q(θ) − θ) (`straight_through`), plus the clip
of θ to [−1, 1] (`clip_params`).

Masks select the leaves that are quantized: pytrees of bools, or functions params ↦ bools as
`optax.masked` takes them; `mask_by_path` builds one from regular expressions on parameter
paths ("a/b/kernel", matched whole, see `qjax.rules`; the paper keeps BatchNorm, biases, 1×1
shortcuts and, for ternary, the first and last layers in float).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from qjax.prox import Quantizer, get_quantizer
from qjax.rules import compile_pattern, path_names, unmatched_patterns

__all__ = [
    "ProxQuantState",
    "clip_params",
    "hard_quantize",
    "linear_reg_schedule",
    "mask_by_path",
    "prox_quant",
    "quantization_error",
    "reg_for_total_pull",
    "straight_through",
    "total_pull",
]

_NO_PARAMS = "this transform needs params: call update(updates, state, params)"

Mask = Any  # a pytree of bools with the params' structure, or a function params -> that pytree


class ProxQuantState(NamedTuple):
    """State of `prox_quant`: the step count t that λ_t is evaluated at."""

    count: jax.Array


def _resolve_quantizer(quantizer: Quantizer | str) -> Quantizer:
    if isinstance(quantizer, Quantizer):
        return quantizer
    if isinstance(quantizer, str):
        return get_quantizer(quantizer)
    raise ValueError(f"quantizer must be a qjax.prox.Quantizer or a name, got {quantizer!r}")


def _resolve_mask(mask: Mask | None, params: Any) -> Any:
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    mask_tree = mask(params) if callable(mask) else mask
    try:
        jax.tree.map(lambda *_: None, params, mask_tree)
    except ValueError as error:
        raise ValueError(f"mask must have the structure of params: {error}") from None
    return mask_tree


def linear_reg_schedule(
    *,
    learning_rate: float,
    reg: float,
    steps_per_epoch: int,
    growth: Literal["epoch", "step"] = "epoch",
) -> optax.Schedule:
    """The paper's prox strength η·λ_t with λ_t = λ·epoch, as a schedule of the step count t.

    Args:
      learning_rate: η, the (constant) learning rate of the optimizer before the prox. With a
        learning rate that changes, pass 1 and multiply by the current η_t (the strength is
        η_t·λ_t in the authors' code).
      reg: λ, the regularization growth per epoch (1e-4 for the paper's CIFAR-10 runs).
      steps_per_epoch: optimizer steps per epoch.
      growth: "epoch" (the authors' code: λ_t = λ·e during epoch e = 0, 1, …, so the first
        epoch has no pull) or "step" (λ_t = λ·t / steps_per_epoch, growing every step).

    Returns:
      A schedule count ↦ η·λ·⌊count / steps_per_epoch⌋ ("epoch") or η·λ·count / steps_per_epoch.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if not (learning_rate >= 0 and reg >= 0):
        raise ValueError(f"learning_rate and reg must be >= 0, got {learning_rate}, {reg}")
    if growth == "epoch":
        return lambda count: learning_rate * reg * (count // steps_per_epoch)
    if growth == "step":
        return lambda count: learning_rate * reg * count / steps_per_epoch
    raise ValueError(f"growth must be 'epoch' or 'step', got {growth!r}")


def total_pull(
    *,
    learning_rate: float,
    reg: float,
    steps_per_epoch: int,
    epochs: int,
    growth: Literal["epoch", "step"] = "epoch",
) -> float:
    """Σ_t η·λ_t over a run of `epochs`: how far the prox can move a weight in total.

    The paper's CIFAR runs (η = 0.01, λ = 1e-4, 390 steps per epoch, 200 epochs before the
    freeze, growth per epoch) have a total pull of ≈ 7.8; the same λ over 2 epochs gives
    ≈ 4e-4, so the prox does nothing. `reg_for_total_pull` inverts this.

    Returns:
      η·λ·S·E(E−1)/2 (per epoch) or η·λ·(SE)(SE−1)/(2S) (per step), S = steps_per_epoch,
      E = epochs.
    """
    steps = steps_per_epoch * epochs
    if growth == "epoch":
        return learning_rate * reg * steps_per_epoch * epochs * (epochs - 1) / 2
    if growth == "step":
        return learning_rate * reg * steps * (steps - 1) / (2 * steps_per_epoch)
    raise ValueError(f"growth must be 'epoch' or 'step', got {growth!r}")


def reg_for_total_pull(
    pull: float,
    *,
    learning_rate: float,
    steps_per_epoch: int,
    epochs: int,
    growth: Literal["epoch", "step"] = "epoch",
) -> float:
    """The λ whose run of `epochs` has the total pull Σ_t η·λ_t = `pull` (see `total_pull`).

    A rule for short runs: keep the paper's total pull (≈ 8) instead of its λ = 1e-4, e.g.
    `reg_for_total_pull(8.0, learning_rate=0.01, steps_per_epoch=390, epochs=2)` ≈ 2.05.
    """
    unit = total_pull(
        learning_rate=learning_rate,
        reg=1.0,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        growth=growth,
    )
    if not unit > 0:
        raise ValueError(
            f"a run of {epochs} epochs × {steps_per_epoch} steps with growth {growth!r} and "
            f"learning rate {learning_rate} has no pull for any λ "
            "(growth 'epoch' needs at least 2 epochs)"
        )
    return pull / unit


def prox_quant(
    reg_schedule: optax.ScalarOrSchedule,
    quantizer: Quantizer | str = "binary",
    *,
    clip: float | None = None,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    """ProxQuant's prox step, the last link of an optax chain.

    Example::

        tx = optax.chain(optax.adam(1e-2), qjax.prox_quant(schedule, "binary", clip=1.0))

    Args:
      reg_schedule: the prox strength λ_t (in the paper's notation η_t·λ_t: the learning rate is
        not known to this link), a constant or an `optax.Schedule` of the step count.
      quantizer: a `qjax.prox.Quantizer` (e.g. `qjax.prox.multibit_quantizer(2)`) or one of
        "binary", "ternary".
      clip: if given, θ is clipped to [−clip, clip] after the prox (the paper's binary runs
        clip to [−1, 1]).
      mask: which leaves to quantize (a bool pytree or params ↦ bool pytree); the others pass
        their incoming updates through unchanged. With `optax.inject_hyperparams`, give a pytree
        or wrap with `optax.masked` instead (a function would be taken for a schedule).

    Returns:
      An `optax.GradientTransformation` whose `update` requires `params` and returns updates
      with params + updates = clip(prox_{λ_t R}(params + incoming updates)).
    """
    quantizer = _resolve_quantizer(quantizer)

    def init_fn(params):
        del params
        return ProxQuantState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        strength = reg_schedule(state.count) if callable(reg_schedule) else reg_schedule

        def step(param, update):
            theta = quantizer.prox(param + update, jnp.asarray(strength, param.dtype))
            if clip is not None:
                theta = jnp.clip(theta, -clip, clip)
            return (theta - param).astype(update.dtype)

        updates = jax.tree.map(step, params, updates)
        return updates, ProxQuantState(count=optax.safe_increment(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else optax.masked(transform, mask)


def clip_params(bound: float, *, mask: Mask | None = None) -> optax.GradientTransformation:
    """Clip parameters to [−bound, bound] after the step (BinaryConnect's clip of θ to [−1, 1]).

    Last link of a chain; needs `params`: params + updates = clip(params + incoming updates).
    """
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        updates = jax.tree.map(
            lambda p, u: (jnp.clip(p + u, -bound, bound) - p).astype(u.dtype), params, updates
        )
        return updates, state

    transform = optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
    return transform if mask is None else optax.masked(transform, mask)


def straight_through(
    params: Any, quantizer: Quantizer | str = "binary", *, mask: Mask | None = None
) -> Any:
    """BinaryConnect's parameter map: θ ↦ θ + stop_gradient(q(θ) − θ) on the masked leaves.

    Apply it inside the loss: the forward pass sees q(θ) and the gradient flows to θ unchanged
    (the straight-through estimator), so any optimizer then updates the float θ.

    Args:
      params: the float parameters θ.
      quantizer: a `Quantizer` or a name ("binary", "ternary"); its `project` is q.
      mask: which leaves to quantize; all if None.

    Returns:
      A pytree of params' structure whose values are q(θ) where masked, θ elsewhere.
    """
    quantizer = _resolve_quantizer(quantizer)
    mask_tree = _resolve_mask(mask, params)
    return jax.tree.map(
        lambda p, m: p + jax.lax.stop_gradient(quantizer.project(p) - p) if m else p,
        params,
        mask_tree,
    )


def hard_quantize(
    params: Any, quantizer: Quantizer | str = "binary", *, mask: Mask | None = None
) -> Any:
    """Replace every masked leaf θ by its hard quantization q(θ) (the end of training)."""
    quantizer = _resolve_quantizer(quantizer)
    mask_tree = _resolve_mask(mask, params)
    return jax.tree.map(lambda p, m: quantizer.project(p) if m else p, params, mask_tree)


def mask_by_path(
    include: str = r"(.*/)?(kernel|embedding)", exclude: Sequence[str] = ()
) -> Callable[[Any], Any]:
    """A mask function: True at leaves whose path matches `include` and none of `exclude`.

    Paths are "a/b/c" strings (`qjax.rules.path_name`: Linen variables and NNX state alike) and a
    pattern must match a whole path (`re.fullmatch`), as everywhere in qjax. The default quantizes
    every Dense/Conv kernel and Embed table and leaves biases and normalization in float. A
    pattern that matches no leaf of the params it is applied to raises a `ValueError`.

    Example (the paper's ternary mask for `qjax.models.resnet`)::

        mask = mask_by_path(r".*/kernel", exclude=[".*shortcut.*", "conv_init/.*", "head/.*"])

    Args:
      include: regular expression a quantized leaf's path must match.
      exclude: regular expressions of paths to keep in float even if `include` matches.

    Returns:
      params ↦ a bool pytree of params' structure, usable wherever a mask is taken.
    """
    include_pattern = compile_pattern(include)
    exclude_patterns = [compile_pattern(pattern) for pattern in exclude]

    def mask_fn(params):
        names = path_names(params)
        unmatched = unmatched_patterns([include, *exclude], jax.tree.leaves(names))
        if unmatched:
            raise ValueError(
                f"mask pattern(s) {unmatched} match no parameter (patterns must match a whole "
                f"path, re.fullmatch); parameters: {', '.join(jax.tree.leaves(names))}"
            )
        return jax.tree.map(
            lambda name: (
                bool(include_pattern.fullmatch(name))
                and not any(pattern.fullmatch(name) for pattern in exclude_patterns)
            ),
            names,
        )

    return mask_fn


def quantization_error(
    params: Any, quantizer: Quantizer | str = "binary", *, mask: Mask | None = None
) -> ArrayLike:
    """max over masked leaves of max|θ − q(θ)|: 0 exactly when the weights are quantized."""
    quantizer = _resolve_quantizer(quantizer)
    mask_tree = _resolve_mask(mask, params)
    errors = [
        jnp.max(jnp.abs(p - quantizer.project(p)))
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask_tree), strict=True)
        if m
    ]
    return jnp.max(jnp.stack(errors)) if errors else jnp.zeros(())
