"""Tests for qjax.models: shapes, parameter layout of the papers' networks, train/eval modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import models


def param_shapes(variables):
    return jax.tree.map(jnp.shape, variables["params"])


def test_paper_mlp_layout():
    model = models.MLP()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
    shapes = param_shapes(variables)
    assert [shapes[f"Dense_{i}"]["kernel"] for i in range(3)] == [(784, 500), (500, 300), (300, 10)]
    assert shapes["BatchNorm_0"]["scale"] == (500,) and shapes["BatchNorm_1"]["scale"] == (300,)
    assert set(variables) == {"params", "batch_stats"}
    logits = model.apply(variables, jnp.ones((3, 28, 28, 1)))
    assert logits.shape == (3, 10)


def test_mlp_train_mode_updates_batch_stats():
    model = models.MLP(hidden=(8,))
    x = jax.random.normal(jax.random.key(1), (16, 5)) + 3.0
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    mean = updates["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(mean, variables["batch_stats"]["BatchNorm_0"]["mean"])
    # Momentum 0.9: the running mean moves a tenth of the way to the batch mean.
    hidden = jax.nn.relu(x @ variables["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(mean, 0.1 * hidden.mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("scale", "hidden"), [(1, (500, 300)), (0.5, (250, 150)), (2, (1000, 600))]
)
def test_scaled_mlp(scale, hidden):
    assert models.scaled_mlp(scale).hidden == hidden


def test_scaled_mlp_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        models.scaled_mlp(0)


def test_paper_cnn_layout():
    model = models.CNN()
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    shapes = param_shapes(variables)
    convs = [shapes[f"Conv_{i}"]["kernel"] for i in range(6)]
    assert convs == [
        (3, 3, 3, 32),
        (3, 3, 32, 32),
        (3, 3, 32, 64),
        (3, 3, 64, 64),
        (3, 3, 64, 128),
        (3, 3, 128, 128),
    ]
    assert shapes["Dense_0"]["kernel"] == (4 * 4 * 128, 128)
    assert shapes["Dense_1"]["kernel"] == (128, 10)
    assert model.apply(variables, x).shape == (2, 10)


def test_cnn_dropout_only_in_training():
    model = models.CNN(stages=(4,), dense=8, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    out_a, _ = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    out_b, _ = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
    )
    assert not np.allclose(out_a, out_b)
