"""Prox operators and hard quantizers of ProxQuant (Bai, Wang & Liberty, ICLR 2019).

ProxQuant trains a quantized network as regularized learning: a quantization-inducing
regularizer R pulls the float weights θ toward a quantized set Q, through its proximal operator

    prox_{λR}(θ) = argmin_x ½‖x − θ‖² + λ·R(x).

Three regularizers, each with its hard quantizer (the λ → ∞ limit of the prox):

* binary, the W-shaped R(θ) = Σ_j min|θ_j ± α|: the prox soft-thresholds every entry toward the
  nearest of ±α; the hard quantizer is α·sign(θ). The scale α is a choice (`binary_scale`):
  mean|θ| per tensor (the default) or per output channel, or α = 1 (the paper's CIFAR setting,
  right only when a BatchNorm after each layer absorbs the scale);
* ternary, R(θ) = ½·dist²(θ, T(θ)) toward the ternarization of ternary weight networks (threshold
  Δ = 0.7·mean|θ|, recomputed at each call): prox = (θ + λ·T(θ)) / (1 + λ). The two nonzero
  values are the means of the entries above Δ and below −Δ (the authors' code), or with
  `symmetric=True` ±(the mean of |θ| above Δ), a grid {−v, 0, v} that `qjax.export` can pack;
* multi-bit, the same pull toward the b-bit sum-of-binaries θ ≈ Σ_i α_i·b_i, b_i ∈ {±1}ⁿ, found
  by alternating minimization (Xu et al. 2018): greedy initialisation, then alternating least
  squares on α and re-assignment of the codes. Its 2^b levels are in general not evenly spaced;
  `uniform=True` fits evenly spaced ones, δ·{±1, ±3, …, ±(2^b − 1)} (α_i = 2^(i−1)·δ), which
  `qjax.export` can pack.

Everything here is a pure function of arrays (jit- and vmap-friendly). A `Quantizer` bundles a
prox with its hard quantizer; `qjax.transforms` applies it to parameter pytrees inside optax.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "Quantizer",
    "binary_prox",
    "binary_quantize",
    "binary_quantizer",
    "binary_regularizer",
    "binary_scale",
    "get_quantizer",
    "multibit_prox",
    "multibit_quantize",
    "multibit_quantizer",
    "pull_prox",
    "ternarize",
    "ternary_prox",
    "ternary_quantizer",
]

ScaleRule = Literal["one", "tensor", "channel"]

TERNARY_THRESHOLD_FACTOR = 0.7
MAX_MULTIBIT_BITS = 4


class Quantizer(NamedTuple):
    """A quantization regularizer through its two operators.

    Attributes:
      prox: (θ, λ) ↦ prox_{λR}(θ), same shape as θ; λ a non-negative scalar.
      project: θ ↦ the hard quantization of θ (the λ → ∞ limit of `prox`).
    """

    prox: Callable[[jax.Array, jax.Array], jax.Array]
    project: Callable[[jax.Array], jax.Array]


def _as_float_array(name: str, x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _check_strength(strength: ArrayLike) -> jax.Array:
    strength = jnp.asarray(strength)
    if strength.ndim != 0:
        raise ValueError(f"strength λ must be a scalar, got shape {strength.shape}")
    if not isinstance(strength, jax.core.Tracer) and not float(strength) >= 0:
        raise ValueError(f"strength λ must be non-negative and not NaN, got {float(strength)}")
    return strength


def binary_scale(theta: ArrayLike, rule: ScaleRule = "tensor") -> jax.Array:
    """The scale α of the binary set {±α}.

    Args:
      theta: weights θ; for rule "channel", a Flax kernel whose last axis indexes output channels.
      rule: "tensor" (α = mean|θ|, the XNOR-net scale that minimizes ‖θ − α·sign(θ)‖), "channel"
        (the same mean per output channel) or "one" (α = 1, the paper's CIFAR setting: only
        right when a BatchNorm after the layer absorbs the scale; without one, ±1 weights
        change the layer's output scale and cost accuracy at hard quantization).

    Returns:
      α, broadcastable against θ (a scalar, or shape (1, ..., 1, N1) for "channel").
    """
    theta = _as_float_array("theta", theta)
    if rule == "one":
        return jnp.ones((), theta.dtype)
    if rule == "tensor":
        return jnp.mean(jnp.abs(theta))
    if rule == "channel":
        if theta.ndim < 2:
            raise ValueError(f"rule='channel' needs theta of rank >= 2, got shape {theta.shape}")
        return jnp.mean(jnp.abs(theta), axis=tuple(range(theta.ndim - 1)), keepdims=True)
    raise ValueError(f"rule must be 'one', 'tensor' or 'channel', got {rule!r}")


def binary_quantize(theta: ArrayLike, alpha: ArrayLike = 1.0) -> jax.Array:
    """Hard binary quantizer q(θ) = α·sign(θ), with sign(0) = +1.

    Args:
      theta: weights θ, any shape.
      alpha: the scale α > 0, broadcastable against θ.

    Returns:
      An array of θ's shape with entries in {±α}.
    """
    theta = _as_float_array("theta", theta)
    alpha = jnp.asarray(alpha, theta.dtype)
    return jnp.where(theta >= 0, alpha, -alpha)


def binary_regularizer(theta: ArrayLike, alpha: ArrayLike = 1.0) -> jax.Array:
    """The W-shaped regularizer R(θ) = Σ_j min(|θ_j − α|, |θ_j + α|), zero exactly on {±α}ⁿ."""
    theta = _as_float_array("theta", theta)
    return jnp.sum(jnp.abs(theta - binary_quantize(theta, alpha)))


def binary_prox(theta: ArrayLike, strength: ArrayLike, alpha: ArrayLike = 1.0) -> jax.Array:
    """prox_{λR}(θ) for the W-shaped binary regularizer R, in closed form.

    With q = α·sign(θ) the nearest binary point, the prox moves each entry by at most λ toward q:

        prox_{λR}(θ) = q + sign(θ − q)·max(|θ − q| − λ, 0).

    (For θ ≥ 0 the minimizer is non-negative, where R(x) = |x − α| is convex, so the
    soft-threshold is the exact global minimizer.)

    Args:
      theta: weights θ, any shape.
      strength: λ ≥ 0, a scalar (ProxQuant uses η_t·λ_t: learning rate times regularization).
      alpha: the scale α > 0, broadcastable against θ.

    Returns:
      prox_{λR}(θ), θ's shape and dtype.
    """
    theta = _as_float_array("theta", theta)
    strength = _check_strength(strength).astype(theta.dtype)
    q = binary_quantize(theta, alpha)
    residual = theta - q
    return q + jnp.sign(residual) * jnp.maximum(jnp.abs(residual) - strength, 0)


def pull_prox(theta: ArrayLike, strength: ArrayLike, target: ArrayLike) -> jax.Array:
    """prox of λ/2·‖x − q‖² at θ, with q = `target` held fixed: (θ + λ·q) / (1 + λ).

    This is the ternary and multi-bit ProxQuant step, with q the quantization of θ.
    """
    theta = _as_float_array("theta", theta)
    strength = _check_strength(strength).astype(theta.dtype)
    return (theta + strength * target) / (1 + strength)


def ternarize(theta: ArrayLike, *, symmetric: bool = False) -> jax.Array:
    """Ternary quantizer of ternary weight networks.

    Δ = 0.7·mean|θ|; entries with |θ| ≤ Δ become 0. With `symmetric=False` (the ProxQuant
    authors' code) entries with θ > Δ take the mean of those entries and entries with θ < −Δ the
    mean of those: values {v₋, 0, v₊} with v₋ ≠ −v₊ in general, which no zero-centred uniform
    grid holds (so `qjax.export` cannot pack them). With `symmetric=True` (ternary weight
    networks' own rule) both take ±v, v = the mean of |θ| over |θ| > Δ: values {−v, 0, v}.
    One threshold and one or two values per tensor.

    Args:
      theta: weights θ, any shape.
      symmetric: one magnitude for both signs.

    Returns:
      T(θ), θ's shape, entries in {v₋, 0, v₊} (or {−v, 0, v}).
    """
    theta = _as_float_array("theta", theta)
    delta = TERNARY_THRESHOLD_FACTOR * jnp.mean(jnp.abs(theta))
    above = theta > delta
    below = theta < -delta
    if symmetric:
        outside = above | below
        value = jnp.sum(jnp.where(outside, jnp.abs(theta), 0)) / jnp.maximum(jnp.sum(outside), 1)
        return jnp.where(above, value, jnp.where(below, -value, 0)).astype(theta.dtype)
    value_above = jnp.sum(jnp.where(above, theta, 0)) / jnp.maximum(jnp.sum(above), 1)
    value_below = jnp.sum(jnp.where(below, theta, 0)) / jnp.maximum(jnp.sum(below), 1)
    return jnp.where(above, value_above, jnp.where(below, value_below, 0)).astype(theta.dtype)


def ternary_prox(theta: ArrayLike, strength: ArrayLike, *, symmetric: bool = False) -> jax.Array:
    """prox of λ/2·dist²(θ, T) toward the ternarization: (θ + λ·T(θ)) / (1 + λ)."""
    return pull_prox(theta, strength, ternarize(theta, symmetric=symmetric))


def _sign_codebook(bits: int) -> np.ndarray:
    """All 2^b sign vectors, shape (2^b, b)."""
    return np.array(list(itertools.product((-1.0, 1.0), repeat=bits)))


def _alternating_fit(values: jax.Array, bits: int, iterations: int) -> jax.Array:
    """Alternating b-bit quantization of one group of weights (a 1-D array), returning Σ α_i b_i."""
    # Greedy initialisation: α_i = mean|r|, b_i = sign(r), r ← r − α_i·b_i.
    residual = values
    alphas, codes = [], []
    for _ in range(bits):
        alpha = jnp.mean(jnp.abs(residual))
        code = jnp.where(residual >= 0, 1.0, -1.0).astype(values.dtype)
        residual = residual - alpha * code
        alphas.append(alpha)
        codes.append(code)
    alpha = jnp.stack(alphas)
    codes = jnp.stack(codes, axis=1)  # (n, b)
    codebook = jnp.asarray(_sign_codebook(bits), values.dtype)  # (2^b, b)
    ridge = 1e-6 * values.shape[0] * jnp.eye(bits, dtype=values.dtype)

    def refine(_, carry):
        alpha, codes = carry
        # Least squares on α for fixed codes B: (BᵀB) α = Bᵀθ.
        alpha = jnp.linalg.solve(codes.T @ codes + ridge, codes.T @ values)
        # Re-assign codes for fixed α: the nearest of the 2^b representable values.
        levels = codebook @ alpha
        nearest = jnp.argmin(jnp.abs(values[:, None] - levels[None, :]), axis=1)
        return alpha, codebook[nearest]

    alpha, codes = jax.lax.fori_loop(0, iterations, refine, (alpha, codes))
    return codes @ alpha


def _uniform_fit(values: jax.Array, bits: int, iterations: int) -> jax.Array:
    """Evenly spaced b-bit quantization δ·m, m ∈ {±1, ±3, …, ±(2^b − 1)}, of a 1-D array.

    Alternates the least-squares δ = ⟨θ, m⟩ / ⟨m, m⟩ for fixed m and the nearest odd multiple m
    for fixed δ, from δ = max|θ| / (2^b − 1) (so an evenly spaced θ is a fixed point).
    """
    top = 2**bits - 1

    def odd_multiples(delta):
        safe = jnp.where(delta > 0, delta, 1)
        return jnp.clip(2 * jnp.round((values / safe - 1) / 2) + 1, -top, top)

    def refine(_, delta):
        multiples = odd_multiples(delta)
        return jnp.sum(values * multiples) / jnp.sum(multiples * multiples)

    delta = jnp.max(jnp.abs(values)) / top
    delta = jax.lax.fori_loop(0, iterations, refine, delta)
    return delta * odd_multiples(delta)


def multibit_quantize(
    theta: ArrayLike,
    bits: int,
    *,
    channel_axis: int | None = -1,
    iterations: int = 3,
    uniform: bool = False,
) -> jax.Array:
    """Alternating multi-bit quantization θ ≈ Σ_{i=1}^{b} α_i·b_i (Xu et al. 2018).

    Every slice of θ along `channel_axis` (e.g. each output unit of a Flax kernel, or each row
    of an embedding table with `channel_axis=0`) gets its own α ∈ ℝ^b and codes b_i ∈ {±1}.
    Greedy initialisation (α_i = mean|r|, b_i = sign(r) on the running residual r), then
    `iterations` rounds of least squares on α and re-assignment of every entry's code to the
    nearest of the 2^b representable values. With `uniform=True` the α are tied,
    α_i = 2^(i−1)·δ, so the levels are evenly spaced, δ·{±1, ±3, …, ±(2^b − 1)}: rounds of
    nearest level and least squares on δ (exportable with `qjax.export`; a larger error than
    free α).

    Args:
      theta: weights θ.
      bits: b, 1 to 4.
      channel_axis: the axis whose slices are quantized separately; None for one α per tensor.
      iterations: alternating rounds after the start.
      uniform: evenly spaced levels (one δ per slice).

    Returns:
      The quantized weights, θ's shape; each slice takes at most 2^b distinct values. The method
      is a local search: for b ≥ 3 refitting an already quantized tensor can move it to another
      local minimum, so it is not always idempotent.
    """
    theta = _as_float_array("theta", theta)
    if not (isinstance(bits, int) and 1 <= bits <= MAX_MULTIBIT_BITS):
        raise ValueError(f"bits must be an int in 1..{MAX_MULTIBIT_BITS}, got {bits!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if channel_axis is not None and not -theta.ndim <= channel_axis < theta.ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for shape {theta.shape}")
    return _multibit_quantize(theta, bits, channel_axis, iterations, uniform)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _multibit_quantize(
    theta: jax.Array, bits: int, channel_axis: int | None, iterations: int, uniform: bool
) -> jax.Array:
    # Jitted so that eager calls (hard_quantize outside a training step) compile once per shape.
    fit = functools.partial(
        _uniform_fit if uniform else _alternating_fit, bits=bits, iterations=iterations
    )
    if channel_axis is None:
        return fit(theta.reshape(-1)).reshape(theta.shape)
    moved = jnp.moveaxis(theta, channel_axis, 0)
    groups = moved.reshape(moved.shape[0], -1)
    return jnp.moveaxis(jax.vmap(fit)(groups).reshape(moved.shape), 0, channel_axis)


def multibit_prox(
    theta: ArrayLike,
    strength: ArrayLike,
    bits: int,
    *,
    channel_axis: int | None = -1,
    iterations: int = 3,
    uniform: bool = False,
) -> jax.Array:
    """prox of λ/2·dist²(θ, Q_b(θ)) toward the alternating b-bit quantization Q_b(θ)."""
    target = multibit_quantize(
        theta, bits, channel_axis=channel_axis, iterations=iterations, uniform=uniform
    )
    return pull_prox(theta, strength, target)


def binary_quantizer(scale: ScaleRule = "tensor") -> Quantizer:
    """The binary `Quantizer`: W-shaped prox toward {±α}, α from `binary_scale(θ, scale)`.

    Args:
      scale: "tensor" (α = mean|θ|, the default), "channel" (per output channel) or "one"
        (α = 1, the paper's CIFAR setting; see `binary_scale`).
    """
    binary_scale(jnp.zeros((1, 1)), scale)  # validates the rule name
    return Quantizer(
        prox=lambda theta, strength: binary_prox(theta, strength, binary_scale(theta, scale)),
        project=lambda theta: binary_quantize(theta, binary_scale(theta, scale)),
    )


def ternary_quantizer(*, symmetric: bool = False) -> Quantizer:
    """The ternary `Quantizer`: pull toward `ternarize(θ, symmetric=symmetric)`.

    Args:
      symmetric: values {−v, 0, v} (exportable) instead of the authors' {v₋, 0, v₊}.
    """
    return Quantizer(
        prox=functools.partial(ternary_prox, symmetric=symmetric),
        project=functools.partial(ternarize, symmetric=symmetric),
    )


def multibit_quantizer(
    bits: int, *, channel_axis: int | None = -1, iterations: int = 3, uniform: bool = False
) -> Quantizer:
    """The b-bit `Quantizer`: pull toward the alternating quantization `multibit_quantize`.

    Args:
      bits, channel_axis, iterations, uniform: as in `multibit_quantize` (`uniform=True`:
        evenly spaced, exportable levels).
    """
    multibit_quantize(jnp.zeros((1, 1)), bits, channel_axis=None, iterations=iterations)

    def project(theta):
        return multibit_quantize(
            theta, bits, channel_axis=channel_axis, iterations=iterations, uniform=uniform
        )

    return Quantizer(
        prox=lambda theta, strength: pull_prox(theta, strength, project(theta)), project=project
    )


def get_quantizer(
    name: str,
    *,
    bits: int = 1,
    scale: ScaleRule = "tensor",
    symmetric: bool = False,
    uniform: bool = False,
) -> Quantizer:
    """A `Quantizer` by name.

    Args:
      name: "binary" (with `scale`: α = mean|θ| per tensor by default), "ternary" (with
        `symmetric`) or "multibit" (with `bits` and `uniform`).
      bits, scale, symmetric, uniform: the options of `multibit_quantizer`,
        `binary_quantizer` and `ternary_quantizer`.

    Returns:
      The `Quantizer`.
    """
    if name == "binary":
        return binary_quantizer(scale)
    if name == "ternary":
        return ternary_quantizer(symmetric=symmetric)
    if name == "multibit":
        return multibit_quantizer(bits, uniform=uniform)
    raise ValueError(f"quantizer must be 'binary', 'ternary' or 'multibit', got {name!r}")
