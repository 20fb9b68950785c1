"""Metrics of the ProxQuant experiments: sign changes, accuracy, perplexity.

The sign-change fraction measures how stable a quantized training run is: the fraction of
weights whose sign differs from the float warm start θ₀ (BinaryConnect keeps flipping signs
through training, ProxQuant settles).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qjax.rules import path_names
from qjax.transforms import Mask

__all__ = ["accuracy", "perplexity", "sign_change_fraction", "sign_changes"]


def _sign(x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, 1, -1)


def sign_changes(params: Any, reference: Any, *, mask: Mask | None = None) -> dict[str, jax.Array]:
    """Per layer, the fraction of entries whose sign differs between `params` and `reference`.

    Args:
      params: the current weights θ_t.
      reference: the warm start θ₀, same structure.
      mask: which leaves to measure (bool pytree or params ↦ bool pytree); all if None.

    Returns:
      {leaf path 'a/b/kernel': fraction in [0, 1]} for the masked leaves (sign(0) counts as +).
    """
    try:
        flips = jax.tree.map(lambda p, r: jnp.mean(_sign(p) != _sign(r)), params, reference)
    except ValueError as error:
        raise ValueError(f"params and reference must have the same structure: {error}") from None
    mask_tree = jax.tree.map(lambda _: True, params) if mask is None else mask
    if callable(mask_tree):
        mask_tree = mask_tree(params)
    names, fractions, selected = (
        jax.tree.leaves(t) for t in (path_names(params), flips, mask_tree)
    )
    return {n: f for n, f, m in zip(names, fractions, selected, strict=True) if m}


def sign_change_fraction(params: Any, reference: Any, *, mask: Mask | None = None) -> jax.Array:
    """Fraction of all (masked) weights whose sign differs from `reference`, over all layers."""
    mask_tree = jax.tree.map(lambda _: True, params) if mask is None else mask
    if callable(mask_tree):
        mask_tree = mask_tree(params)
    pairs = [
        (jnp.sum(_sign(p) != _sign(r)), p.size)
        for p, r, m in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(reference),
            jax.tree.leaves(mask_tree),
            strict=True,
        )
        if m
    ]
    if not pairs:
        raise ValueError("mask selects no parameters")
    return sum(flipped for flipped, _ in pairs) / sum(size for _, size in pairs)


def accuracy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Top-1 accuracy of logits (..., classes) against integer labels (...)."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def perplexity(mean_nll: ArrayLike) -> jax.Array:
    """exp(mean negative log-likelihood per token), the language-model metric."""
    return jnp.exp(jnp.asarray(mean_nll))
