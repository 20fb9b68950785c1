"""Tests of the CIFAR ResNets, the CIFAR input pipeline and the LSTM language model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.models import lstm, resnet


@pytest.mark.parametrize(
    ("depth", "n_params"), [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)]
)
def test_resnet_sizes_match_he_et_al(depth, n_params):
    shapes = jax.eval_shape(
        lambda: resnet.CIFARResNet(depth=depth).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
        )
    )
    count = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))
    assert abs(count - n_params) / n_params < 0.05


def test_resnet20_structure_and_output():
    model = resnet.ResNet20()
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    params = variables["params"]
    assert params["conv_init"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage3_block3"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert params["stage2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)
    assert "shortcut_conv" not in params["stage1_block1"]
    assert params["head"]["kernel"].shape == (64, 10)
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and "batch_stats" in state
    with pytest.raises(ValueError, match="depth"):
        resnet.CIFARResNet(depth=21).init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("tied", [False, True])
def test_lstm_shapes_carry_and_tying(tied):
    model = lstm.LSTMLanguageModel(vocab_size=50, embed_dim=8, hidden_dim=8, tied=tied)
    tokens = jnp.ones((3, 7), jnp.int32)
    variables = model.init(jax.random.key(0), tokens, model.initial_carry(3), train=False)
    logits, carry = model.apply(variables, tokens, model.initial_carry(3), train=False)
    assert logits.shape == (3, 7, 50) and carry[0].shape == (3, 8)
    assert ("decoder" in variables["params"]) is not tied
    # Carrying the state across segments equals one pass over the joined sequence.
    first, carry = model.apply(variables, tokens[:, :4], model.initial_carry(3), train=False)
    second, _ = model.apply(variables, tokens[:, 4:], carry, train=False)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), logits, atol=1e-5)


def test_lstm_bad_input():
    model = lstm.LSTMLanguageModel(vocab_size=10, embed_dim=4, hidden_dim=6, tied=True)
    with pytest.raises(ValueError, match="tied"):
        model.init(
            jax.random.key(0), jnp.ones((1, 2), jnp.int32), model.initial_carry(1), train=False
        )
    with pytest.raises(ValueError, match="tokens"):
        model.init(jax.random.key(0), jnp.ones((1, 2)), model.initial_carry(1), train=False)
