"""Tests of BatchNorm re-estimation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import batchnorm


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.Dense(3)(nn.relu(x))
        return nn.BatchNorm(use_running_average=not train, name="bn2")(x)


def test_reestimate_averages_the_batch_statistics():
    model = ConvBN()
    batches = [2.0 + jax.random.normal(jax.random.key(i), (4, 5, 5, 2)) for i in range(3)]
    variables = model.init(jax.random.key(9), batches[0], train=False)
    params = variables["params"]
    new = batchnorm.reestimate_batch_stats(
        lambda v, x, **kw: model.apply(v, x, train=True, **kw), variables, batches
    )
    # NumPy reference: first BatchNorm sees the conv output of each batch.
    kernel = np.asarray(params["Conv_0"]["kernel"])
    conv_outs = [
        np.asarray(
            jax.lax.conv_general_dilated(
                b, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        )
        for b in batches
    ]
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["mean"],
        np.mean([o.mean((0, 1, 2)) for o in conv_outs], 0),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["var"],
        np.mean([o.var((0, 1, 2)) for o in conv_outs], 0),
        rtol=1e-4,
    )
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    assert not np.allclose(new["batch_stats"]["bn2"]["mean"], 0)
    assert new["params"] is params


def test_reestimated_stats_make_eval_match_train_mode_on_one_batch():
    model = ConvBN()
    x = 3.0 + jax.random.normal(jax.random.key(1), (16, 5, 5, 2))
    variables = model.init(jax.random.key(2), x, train=False)
    new = batchnorm.reestimate_batch_stats(
        lambda v, x, **kw: model.apply(v, x, train=True, **kw), variables, [x]
    )
    train_out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(model.apply(new, x, train=False), train_out, atol=2e-3)


def test_bad_input():
    model = ConvBN()
    x = jnp.ones((2, 5, 5, 2))
    variables = model.init(jax.random.key(0), x, train=False)
    apply_fn = lambda v, x, **kw: model.apply(v, x, train=True, **kw)
    with pytest.raises(ValueError, match="empty"):
        batchnorm.reestimate_batch_stats(apply_fn, variables, [])
    with pytest.raises(ValueError, match="batch_stats"):
        batchnorm.reestimate_batch_stats(apply_fn, {"params": variables["params"]}, [x])
