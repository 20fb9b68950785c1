"""Tests of the sign-change metric, accuracy and perplexity."""

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import metrics, transforms


def test_sign_changes_per_layer_and_overall():
    reference = {"a": {"kernel": jnp.array([1.0, -1.0, 2.0, 0.0])}, "b": {"bias": jnp.ones(2)}}
    params = {"a": {"kernel": jnp.array([-1.0, -3.0, 2.0, -0.5])}, "b": {"bias": -jnp.ones(2)}}
    per_layer = metrics.sign_changes(params, reference)
    assert {k: float(v) for k, v in per_layer.items()} == {"a/kernel": 0.5, "b/bias": 1.0}
    masked = metrics.sign_changes(params, reference, mask=transforms.mask_by_path())
    assert list(masked) == ["a/kernel"]
    assert float(metrics.sign_change_fraction(params, reference)) == pytest.approx(4 / 6)
    assert float(metrics.sign_change_fraction(params, params)) == 0.0


def test_sign_changes_bad_input():
    with pytest.raises(ValueError, match="structure"):
        metrics.sign_changes({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="no parameters"):
        metrics.sign_change_fraction({"bias": jnp.ones(2)}, {"bias": jnp.ones(2)}, mask=False)
    with pytest.raises(ValueError, match="match no parameter"):
        metrics.sign_change_fraction(
            {"bias": jnp.ones(2)}, {"bias": jnp.ones(2)}, mask=transforms.mask_by_path()
        )


def test_accuracy_and_perplexity():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert float(metrics.accuracy(logits, jnp.array([1, 0, 0]))) == pytest.approx(2 / 3)
    np.testing.assert_allclose(metrics.perplexity(jnp.log(100.0)), 100.0, rtol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(logits, jnp.array([1, 0]))
