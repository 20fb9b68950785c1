"""Tests of the NNX transformer language model, its perplexity and its sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qjax import data
from qjax.models import TransformerConfig, TransformerLM, transformer

CONFIG = TransformerConfig(
    vocab_size=23, max_len=16, num_layers=3, num_heads=2, d_model=8, mlp_dim=12, dropout_rate=0.1
)


def tokens(shape, seed=0, vocab=CONFIG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def deterministic(model):
    return nnx.view(model, deterministic=True)


def copy_to_stacked(listed: TransformerLM, stacked: TransformerLM) -> None:
    """Gives `stacked` (scan_layers=True) the weights of `listed` (a list of blocks)."""
    blocks = [nnx.state(block, nnx.Param) for block in listed.blocks]
    nnx.update(stacked.blocks, jax.tree.map(lambda *layers: jnp.stack(layers), *blocks))
    for name in ("embed", "position", "final_norm"):
        nnx.update(getattr(stacked, name), nnx.state(getattr(listed, name), nnx.Param))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shapes_and_layer_layout(scan_layers):
    config = dataclasses.replace(CONFIG, tied_head=False, scan_layers=scan_layers)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    logits = deterministic(model)(tokens((2, 5)))
    assert logits.shape == (2, 5, 23) and logits.dtype == jnp.float32
    layers = (3,) if scan_layers else ()
    block = model.blocks if scan_layers else model.blocks[1]
    attention = block.attention
    for projection in (attention.query, attention.key, attention.value):
        assert isinstance(projection, nnx.LinearGeneral)
        assert projection.kernel.shape == (*layers, 8, 2, 4)  # (d_model, heads, head_dim)
    assert isinstance(attention.out, nnx.LinearGeneral)
    assert attention.out.kernel.shape == (*layers, 2, 4, 8)  # (heads, head_dim, d_model)
    assert isinstance(block.mlp_in, nnx.Linear) and block.mlp_in.kernel.shape == (*layers, 8, 12)
    assert block.mlp_out.kernel.shape == (*layers, 12, 8)
    assert model.head.kernel.shape == (8, 23) and model.head.bias is None
    if not scan_layers:
        assert len(model.blocks) == 3


def test_causal():
    model = deterministic(TransformerLM(CONFIG, rngs=nnx.Rngs(1)))
    x = tokens((1, 10))
    changed = x.at[0, 6].set((x[0, 6] + 1) % CONFIG.vocab_size)
    before, after = model(x), model(changed)
    np.testing.assert_allclose(before[:, :6], after[:, :6], rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(before[:, 6:] - after[:, 6:]).max(axis=-1) > 1e-4)


@pytest.mark.parametrize("tied_head", [True, False])
def test_scan_and_list_compute_the_same_function(tied_head):
    listed = TransformerLM(dataclasses.replace(CONFIG, tied_head=tied_head), rngs=nnx.Rngs(2))
    stacked = TransformerLM(
        dataclasses.replace(CONFIG, tied_head=tied_head, scan_layers=True), rngs=nnx.Rngs(3)
    )
    x = tokens((3, 12), seed=1)
    assert not np.allclose(deterministic(listed)(x), deterministic(stacked)(x), atol=1e-3)
    copy_to_stacked(listed, stacked)
    if not tied_head:
        nnx.update(stacked.head, nnx.state(listed.head, nnx.Param))
    expected = deterministic(listed)(x)
    np.testing.assert_allclose(deterministic(stacked)(x), expected, rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda model, x: model(x))
    np.testing.assert_allclose(jitted(deterministic(stacked), x), expected, rtol=1e-5, atol=1e-5)


def test_tied_head_is_the_transposed_embedding():
    tied = TransformerLM(CONFIG, rngs=nnx.Rngs(4))
    untied = TransformerLM(dataclasses.replace(CONFIG, tied_head=False), rngs=nnx.Rngs(4))
    assert tied.head is None
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(untied) - count(tied) == 8 * 23
    nnx.update(untied, nnx.state(tied, nnx.Param))
    untied.head.kernel[...] = tied.embed.embedding[...].T
    x = tokens((2, 7), seed=2)
    np.testing.assert_allclose(
        deterministic(untied)(x), deterministic(tied)(x), rtol=1e-6, atol=1e-6
    )
    # The gradient of the tied model reaches the embedding through the head as well.
    grad = nnx.grad(lambda m: deterministic(m)(x)[0, -1, 5])(tied)
    assert np.abs(grad.embed.embedding[...][5]).max() > 0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_only_in_training_mode(scan_layers):
    model = TransformerLM(dataclasses.replace(CONFIG, scan_layers=scan_layers), rngs=nnx.Rngs(5))
    forward = nnx.jit(lambda model, x: model(x))
    x = tokens((2, 8), seed=3)
    assert not np.allclose(forward(model, x), forward(model, x))  # the dropout stream advances
    view = deterministic(model)
    np.testing.assert_array_equal(forward(view, x), forward(view, x))
    # The view left the model in training mode.
    assert not np.allclose(forward(model, x), forward(model, x))


def test_bad_input():
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model's max_len 16"):
        model(tokens((1, 17)))
    with pytest.raises(ValueError, match=r"integer ids of shape \(batch, time\)"):
        model(jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"integer ids of shape \(batch, time\)"):
        model(jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="must divide d_model"):
        TransformerConfig(vocab_size=10, max_len=8, d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        TransformerConfig(vocab_size=10, max_len=0)
    with pytest.raises(ValueError, match="dropout_rate"):
        TransformerConfig(vocab_size=10, max_len=8, dropout_rate=1.0)


def test_perplexity_is_exp_mean_nll_over_the_whole_stream():
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(6))
    stream = np.asarray(tokens((43,), seed=4))
    value = transformer.perplexity(model, stream, batch_size=3, seq_len=8)
    windows, weights = data.eval_windows(stream, seq_len=8)
    logits = deterministic(model)(jnp.asarray(windows[:, :-1]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    expected = np.exp(np.sum(nll * weights) / 42)
    assert value == pytest.approx(expected, rel=1e-5)
    assert value == pytest.approx(
        transformer.perplexity(model, stream, batch_size=100, seq_len=8), rel=1e-5
    )


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = TransformerLM(dataclasses.replace(CONFIG, tied_head=False), rngs=nnx.Rngs(0))
    model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
    value = transformer.perplexity(model, tokens((30,)), batch_size=2, seq_len=5)
    assert value == pytest.approx(23, rel=1e-5)


def test_perplexity_bad_input():
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 23\)"):
        transformer.perplexity(model, np.array([1, 2, 23, 4, 5]), batch_size=2, seq_len=2)
    with pytest.raises(ValueError, match="batch_size"):
        transformer.perplexity(model, np.arange(10), batch_size=0, seq_len=2)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        transformer.perplexity(model, np.arange(20), batch_size=1, seq_len=17)


def naive_greedy(model, prompt, num_tokens):
    forward = nnx.jit(lambda model, window: model(window)[0, -1])
    context, out = list(prompt), []
    for _ in range(num_tokens):
        window = jnp.asarray([context[-model.config.max_len :]], jnp.int32)
        out.append(int(jnp.argmax(forward(model, window))))
        context.append(out[-1])
    return out


def test_generate_greedy_matches_a_plain_loop_past_max_len():
    model = TransformerLM(dataclasses.replace(CONFIG, max_len=6), rngs=nnx.Rngs(7))
    prompt = np.asarray(tokens((2, 3), seed=5))
    generated = transformer.generate(
        model, prompt, num_tokens=9, key=jax.random.key(0), temperature=0
    )
    assert generated.shape == (2, 9) and generated.dtype == jnp.int32
    for row, start in zip(generated, prompt, strict=True):
        assert list(np.asarray(row)) == naive_greedy(deterministic(model), start, 9)


def test_generate_samples_and_checks_input():
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(8))
    prompt = np.zeros((4, 30), np.int32)  # longer than max_len: the last 16 are the context
    a = transformer.generate(model, prompt, num_tokens=12, key=jax.random.key(1))
    b = transformer.generate(model, prompt, num_tokens=12, key=jax.random.key(2))
    assert a.shape == (4, 12) and not np.array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 23
    with pytest.raises(ValueError, match=r"prompt must lie in \[0, 23\)"):
        transformer.generate(model, np.array([[30]]), num_tokens=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_tokens"):
        transformer.generate(model, np.array([[1]]), num_tokens=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape \(batch, p\)"):
        transformer.generate(model, np.array([1, 2]), num_tokens=1, key=jax.random.key(0))
