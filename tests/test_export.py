"""Tests for qjax.export: packing, grids, scale layouts, errors, pytree behaviour, orbax, and
quantized inference of Linen and NNX models (plain, scanned stacks, group-wise)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax import LayerSpec, alphabets, export, transforms
from qjax.models import CNN, MLP, lstm, resnet
from qjax.rules import path_name
from tests.test_engine import HEADS, LAYERS, D, _linen_and_nnx_lm

# Scale granularities of `alphabets.for_weights`; groups of 8 inputs leave a short last group
# on the 20-input matrices below.
GRANULARITIES = {"tensor": {}, "channel": {"per_channel": True}, "group": {"group_size": 8}}


def _quantize(w, bits=None, *, num_letters=None, granularity="tensor", per_channel=None):
    """Weights rounded to the symmetric alphabet of 2^bits (or num_letters) letters scaled to
    them, and that alphabet."""
    if per_channel is not None:
        granularity = "channel" if per_channel else "tensor"
    alphabet = alphabets.for_weights(
        w, bits=bits, num_letters=num_letters, c=2.0, **GRANULARITIES[granularity]
    )
    return alphabet.project(w), alphabet


def _assert_bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _packed_names(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=export.is_quantized)
    return {path_name(path) for path, leaf in leaves if export.is_quantized(leaf)}


# ---------------------------------------------------------------------------------- packing


@pytest.mark.parametrize(
    ("num_letters", "bits"),
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (15, 4), (16, 4), (17, 8), (255, 8), (256, 8)],
)
def test_container_bits(num_letters, bits):
    assert export.container_bits(num_letters) == bits


@pytest.mark.parametrize("num_letters", [0, 257, 2.0])
def test_container_bits_rejects(num_letters):
    with pytest.raises(ValueError, match="num_letters"):
        export.container_bits(num_letters)


@settings(deadline=None, max_examples=20)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint8)
    packed = export.pack_codes(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (math.ceil(codes.size * bits / 8),)
    np.testing.assert_array_equal(export.unpack_codes(packed, bits, shape), codes)


def test_pack_layout_matches_numpy_packbits():
    # One bit per code, first code in the lowest bit: numpy's little-endian bit order.
    codes = np.random.default_rng(0).integers(0, 2, size=29, dtype=np.uint8)
    np.testing.assert_array_equal(
        export.pack_codes(codes, 1), np.packbits(codes, bitorder="little")
    )
    # Two bits per code: byte = c0 + 4·c1 + 16·c2 + 64·c3.
    codes = np.array([3, 0, 2, 1, 1], np.uint8)
    np.testing.assert_array_equal(export.pack_codes(codes, 2), [3 + 0 + 32 + 64, 1])


def test_pack_rejects_codes_too_large():
    with pytest.raises(ValueError, match="codes must lie in \\[0, 4\\)"):
        export.pack_codes(np.array([0, 4]), 2)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="packed must have shape"):
        export.unpack_codes(jnp.zeros(3, jnp.uint8), 2, (4, 4))


# ------------------------------------------------------------------------- quantize_array


@pytest.mark.parametrize(
    ("dtype", "letters"),
    [(jnp.float32, {"bits": b}) for b in range(1, 9)]
    + [(jnp.float32, {"num_letters": 3})]
    + [(jnp.bfloat16, {"bits": b}) for b in (1, 2, 4)]
    + [(jnp.bfloat16, {"num_letters": 3})],
)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_round_trips_bit_for_bit(granularity, dtype, letters):
    # bits = b: 2^b letters (1 bit binary ±δ/2, 4 bits 16 letters); 3 letters: ternary.
    n = 2 ** letters["bits"] if "bits" in letters else letters["num_letters"]
    w = jax.random.normal(jax.random.key(n), (20, 6)).astype(dtype)
    q, alphabet = _quantize(w, granularity=granularity, **letters)
    assert alphabet.size == n and q.dtype == dtype
    group_size = 8 if granularity == "group" else None
    given = export.quantize_array(q, alphabet)
    assert given.num_letters == n and given.group_size == group_size
    assert given.bits == {2: 1, 3: 2, 4: 2, 8: 4, 16: 4}.get(n, 8)
    assert given.packed.size == math.ceil(q.size * given.bits / 8)
    assert given.scale.shape == {"tensor": (), "channel": (1, 6), "group": (3, 6)}[granularity]
    np.testing.assert_array_equal(given.codes, alphabet.codes(q))
    _assert_bitwise_equal(given.dequantize(), q)
    # Read off the weights: the letters present, a grid no larger, and again bit for bit.
    inferred = export.quantize_array(q, group_size=group_size)
    assert inferred.num_letters <= n
    _assert_bitwise_equal(inferred.dequantize(), q)
    _assert_bitwise_equal(jax.jit(export.QuantizedArray.dequantize)(inferred), q)


@pytest.mark.parametrize("grid", ["signed", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_integer_grids_round_trip_bit_for_bit(grid, granularity, dtype, tmp_path):
    # Signed int4 {-8..7}·s and asymmetric (k - z)·s: 4-bit codes, the scales and (asymmetric)
    # one zero point per scale; dequantize and save/restore give the weights back bit for bit.
    w = (jax.random.normal(jax.random.key(3), (20, 6)) + 0.5).astype(dtype)
    alphabet = alphabets.for_weights(
        w, c=1.0, bits=4, rule="max", grid=grid, **GRANULARITIES[granularity]
    )
    q = alphabet.project(w)
    packed = export.quantize_array(q, alphabet)
    assert packed.bits == 4 and packed.num_letters == 16
    assert packed.signed == (grid == "signed")
    if grid == "asymmetric":
        assert packed.zero_point.shape == packed.scale.shape
        np.testing.assert_array_equal(
            packed.zero_point.reshape(np.shape(alphabet.zero_point)), alphabet.zero_point
        )
    else:
        assert packed.zero_point is None
    np.testing.assert_array_equal(packed.codes, alphabet.codes(q))
    _assert_bitwise_equal(packed.dequantize(), q)
    _assert_bitwise_equal(jax.jit(export.QuantizedArray.dequantize)(packed), q)
    export.save(str(tmp_path / "checkpoint"), {"kernel": packed})
    restored = export.restore(str(tmp_path / "checkpoint"))["kernel"]
    assert (restored.signed, restored.group_size) == (packed.signed, packed.group_size)
    _assert_bitwise_equal(restored.dequantize(), q)
    if grid == "signed":  # read off the weights: 4 bits (signed if {-8..7} needs it), exact
        group_size = 8 if granularity == "group" else None
        inferred = export.quantize_array(q, group_size=group_size)
        assert inferred.bits == 4 and inferred.num_letters <= (16 if inferred.signed else 15)
        _assert_bitwise_equal(inferred.dequantize(), q)
    # The centred alphabet of the same step does not hold these letters.
    centred = alphabets.UniformAlphabet(alphabet.step, 16, alphabet.group_size)
    with pytest.raises(ValueError, match="off the alphabet"):
        export.quantize_array(q, centred)


def test_inferred_signed_int4_grid_takes_four_bits():
    # {-8..7}·s: the zero-centred grid would need 17 letters (a byte per code).
    q = (np.arange(-8, 8, dtype=np.float32) * np.float32(0.37)).reshape(4, 4)
    packed = export.quantize_array(q, channel_axis=None)
    assert packed.signed and packed.num_letters == 16 and packed.bits == 4
    _assert_bitwise_equal(packed.dequantize(), q)
    # Without -8, the zero-centred {-7..7} grid (15 letters) is as small and stays.
    centred = export.quantize_array(q[1:], channel_axis=None)
    assert not centred.signed and centred.num_letters == 15
    _assert_bitwise_equal(centred.dequantize(), q[1:])


def _stacked(w, *, bits, group_size=None, in_axes=1):
    """A stacked kernel (L, *inputs, *outputs) of a scanned layer quantized as the engine does:
    slice by slice, on the matrix view (inputs × outputs), per output channel or group-wise."""

    def one(kernel):
        matrix = kernel.reshape(math.prod(kernel.shape[:in_axes]), -1)
        alphabet = alphabets.for_weights(
            matrix, bits=bits, c=2.0, per_channel=True, group_size=group_size
        )
        return alphabet.project(matrix).reshape(kernel.shape), alphabet.step

    q, steps = jax.vmap(one)(w)
    return q, alphabets.UniformAlphabet(steps, 2**bits, group_size)


def test_stacked_attention_kernels_per_slice_and_channel():
    # (L, d, heads, head_dim): one 8-letter alphabet per slice and output channel (head, k).
    w = jax.random.normal(jax.random.key(20), (3, 12, 2, 4))
    q, alphabet = _stacked(w, bits=3)
    assert alphabet.step.shape == (3, 8)
    for packed in (export.quantize_array(q, alphabet), export.quantize_array(q)):
        assert packed.scale.shape == (3, 1, 2, 4) and packed.group_size is None
        assert packed.num_letters == 8
        _assert_bitwise_equal(packed.dequantize(), q)
    # The same layout asked for explicitly: a step per slice (axis 0) and output (axes 2, 3).
    packed = export.quantize_array(q, channel_axis=(0, 2, 3))
    _assert_bitwise_equal(packed.dequantize(), q)
    with pytest.raises(ValueError, match=r"one step per index of axes \(0, 3\)"):
        export.quantize_array(q, channel_axis=(0, -1))


@pytest.mark.parametrize(
    ("shape", "in_axes", "group_size", "scale_shape"),
    [
        ((3, 12, 2, 4), 1, 8, (3, 2, 8)),  # q/k/v (L, d, heads, head_dim): 12 inputs, 8 + 4
        ((3, 2, 4, 6), 2, 3, (3, 3, 6)),  # out (L, heads, head_dim, d): groups across heads
        ((2, 20, 6), 1, 8, (2, 3, 6)),  # a stacked Dense kernel
    ],
)
def test_stacked_group_wise_kernels(shape, in_axes, group_size, scale_shape):
    w = jax.random.normal(jax.random.key(21), shape)
    q, alphabet = _stacked(w, bits=2, group_size=group_size, in_axes=in_axes)
    assert alphabet.step.shape == scale_shape
    for packed in (
        export.quantize_array(q, alphabet),
        export.quantize_array(q, group_size=group_size),
    ):
        # The scale is the alphabet's step (*stack, ⌈N0/g⌉, N1) for the matrix view.
        assert (packed.scale.shape, packed.group_size) == (scale_shape, group_size)
        _assert_bitwise_equal(packed.dequantize(), q)
    np.testing.assert_array_equal(export.quantize_array(q, alphabet).scale, alphabet.step)
    # Without group_size the grid is not found, and the message says what to try.
    with pytest.raises(ValueError, match="pass group_size= if it has group-wise steps"):
        export.quantize_array(q)


def test_group_wise_layout_errors():
    w = jax.random.normal(jax.random.key(22), (20, 6))
    q, alphabet = _quantize(w, 2, granularity="group")
    with pytest.raises(
        ValueError, match=r"'x' has step of shape \(3, 6\); expected \(\*stack, ⌈N0/8⌉"
    ):
        export.quantize_array(jnp.concatenate([q, q]), alphabet, name="x")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        export.quantize_array(q, group_size=0)
    with pytest.raises(
        ValueError, match=r"contiguous and non-empty; channel_axis 1 leaves \(0, 2\)"
    ):
        export.quantize_array(q.reshape(4, 5, 6), channel_axis=1, group_size=2)
    # A group-wise grid given explicitly: the axes with a step each are the outputs.
    packed = export.quantize_array(q, channel_axis=-1, group_size=8)
    assert packed.scale.shape == (3, 6)
    _assert_bitwise_equal(packed.dequantize(), q)


@pytest.mark.parametrize("num_letters", [2, 4, 16, 256])
def test_even_alphabets_without_zero(num_letters):
    # The GPFQ reference code's R·linspace(-1, 1, 2^b): letters ±δ/2, ±3δ/2, ...
    w = jax.random.normal(jax.random.key(1), (40, 3))
    alphabet = alphabets.uniform(num_letters, 1.5)
    q = alphabet.project(w)
    for known in (alphabet, None):
        packed = export.quantize_array(q, known)
        assert packed.num_letters == num_letters
        np.testing.assert_allclose(packed.dequantize(), q, rtol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_inferred_grid_matches_the_alphabet(bits):
    w = jax.random.normal(jax.random.key(2), (64, 8))
    q, alphabet = _quantize(w, bits)
    packed = export.quantize_array(q)
    assert packed.num_letters == alphabet.size
    assert packed.scale.size == 1  # one alphabet for the layer: one scale
    np.testing.assert_allclose(packed.scale, alphabet.step, rtol=1e-6)
    np.testing.assert_array_equal(packed.codes, alphabet.codes(q))
    np.testing.assert_allclose(packed.dequantize(), q, rtol=1e-6, atol=0)


def test_inferred_grid_of_a_kernel_larger_than_the_sample():
    # 8 letters ±δ/2, ±3δ/2, ... per column; the first 300 rows hold only ±3δ/2, whose grid has
    # the unit 3δ/2: the grid must come from all the rows (unit δ/2), not from the first ones.
    rng = np.random.default_rng(23)
    step = rng.uniform(0.5, 2.0, size=300).astype(np.float32)
    offsets = np.concatenate(
        [
            rng.choice([-1.5, 1.5], size=(300, 300)),
            rng.choice(np.arange(8) - 3.5, (200, 300)),
        ]
    ).astype(np.float32)
    w = offsets * step
    packed = export.quantize_array(w)
    assert (packed.num_letters, packed.scale.shape) == (8, (1, 300))
    np.testing.assert_allclose(packed.scale[0], step, rtol=1e-6)
    _assert_bitwise_equal(packed.dequantize(), w)


def test_inferred_per_channel_and_per_row():
    w = jax.random.normal(jax.random.key(3), (30, 5))
    q, alphabet = _quantize(w, 2, per_channel=True)
    packed = export.quantize_array(q)
    assert packed.scale.shape == (1, 5)
    np.testing.assert_allclose(packed.scale[0], alphabet.step, rtol=1e-6)
    # An embedding table with one binary scale per row (ProxQuant's channel_axis=0).
    alpha = jnp.abs(w).mean(axis=1, keepdims=True)
    table = jnp.where(w >= 0, alpha, -alpha)
    packed = export.quantize_array(table)
    assert (packed.num_letters, packed.bits, packed.scale.shape) == (2, 1, (30, 1))
    np.testing.assert_allclose(packed.dequantize(), table, rtol=1e-6)


def test_nearly_equal_channel_scales_stay_per_channel():
    # Per-channel binary letters ±R_c with R_c within 1e-4 of each other: one scale per channel,
    # and the weights come back exactly (a shared scale would be off by up to 1e-4·R).
    radius = 0.2 * (1 + 1e-4 * jnp.arange(6))
    signs = jnp.sign(jax.random.normal(jax.random.key(11), (50, 6)))
    w = alphabets.uniform(2, radius).project(signs * radius)
    packed = export.quantize_array(w)
    assert packed.scale.shape == (1, 6)
    np.testing.assert_array_equal(packed.dequantize(), w)
    with pytest.raises(ValueError, match="off the alphabet"):
        export.quantize_array(w, channel_axis=None)


def test_inferred_grid_with_missing_letters():
    delta = 0.37
    # Letters 0, 2δ, -5δ only: the grid is {-5..5}·δ (11 letters, 4 bits).
    w = delta * np.array([[0.0, 2.0, -5.0], [2.0, 2.0, 0.0]], np.float32)
    packed = export.quantize_array(w, channel_axis=None)
    assert packed.num_letters == 11
    np.testing.assert_allclose(packed.scale, delta, rtol=1e-6)
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6)
    # Letters ±δ/2 and 3δ/2 (no 0): the even grid {±1/2, ±3/2}·δ (4 letters, 2 bits).
    w = delta * np.array([-0.5, 0.5, 1.5, 1.5], np.float32)
    packed = export.quantize_array(w)
    assert (packed.num_letters, packed.bits) == (4, 2)
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6)


def test_ternary_channel_without_zero_stays_ternary():
    # Channel 0 uses {-δ, 0, δ}, channel 1 only ±δ': both fit one odd grid, 3 letters.
    w = np.array([[-1.0, 0.5], [0.0, -0.5], [1.0, 0.5]], np.float32)
    packed = export.quantize_array(w, channel_axis=-1)
    assert packed.num_letters == 3
    np.testing.assert_array_equal(packed.dequantize(), w)


def test_all_zero_tensor():
    packed = export.quantize_array(np.zeros((4, 3), np.float32))
    assert (packed.num_letters, packed.bits) == (1, 1)
    np.testing.assert_array_equal(packed.dequantize(), 0)


# ----------------------------------------------------------------------------------- errors


def test_rejects_nan_and_inf():
    w = np.ones((3, 3), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(ValueError, match="'layer/kernel' contains NaN"):
        export.quantize_array(w, name="layer/kernel")
    w[1, 1] = np.inf
    with pytest.raises(ValueError, match="contains Inf"):
        export.quantize_array(w)


def test_rejects_weights_off_the_alphabet():
    w = jax.random.normal(jax.random.key(5), (20, 4))
    q, alphabet = _quantize(w, 2)
    with pytest.raises(ValueError, match="weights of 'x' are off the alphabet: 80 of 80"):
        export.quantize_array(w, alphabet, name="x")
    with pytest.raises(
        ValueError,
        match="'x' are off the alphabet: no zero-centred uniform grid .* 80 distinct values in 80 "
        r"entries, so they look unquantized; quantize this parameter first, or pass its alphabet "
        r"\(alphabets=\{'x': ...\}\), or leave it out of the export \(mask=\)",
    ):
        export.quantize_array(w, name="x")
    # How far off: the nudged entry is 0.01 steps from its letter.
    nudged = q.at[3, 2].add(0.01 * alphabet.step)
    with pytest.raises(
        ValueError,
        match=r"1 of 80 entries, e.g. w\[3, 2\] = .* is 0.01 steps from its nearest letter .*; "
        "quantize this parameter first, or pass its alphabet",
    ):
        export.quantize_array(nudged, alphabet)


def test_rejects_non_uniform_letters():
    # ProxQuant's 2-bit alternating quantization: letters ±α1 ± α2, not equally spaced.
    letters = alphabets.from_letters([-1.3, -0.7, 0.7, 1.3])
    w = np.array([[-1.3, 0.7], [1.3, -0.7]], np.float32)
    with pytest.raises(ValueError, match="'lstm' are not uniform and zero-centred"):
        export.quantize_array(w, letters, name="lstm")
    with pytest.raises(ValueError, match="not uniform and zero-centred"):
        export.quantize_array(np.zeros(2, np.float32), alphabets.from_letters([0.0, 1.0, 2.0]))
    uniform_letters = alphabets.from_letters([-3.0, -1.0, 1.0, 3.0])
    packed = export.quantize_array(np.array([3.0, -1.0], np.float32), uniform_letters)
    assert packed.num_letters == 4
    np.testing.assert_array_equal(packed.dequantize(), [3.0, -1.0])


def test_rejects_bad_arguments():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="must be a float array"):
        export.quantize_array(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"step of shape \(4,\)"):
        export.quantize_array(w, alphabets.symmetric(1, jnp.ones(4)))
    with pytest.raises(ValueError, match="channel_axis 2 is out of range"):
        export.quantize_array(w, channel_axis=2)
    with pytest.raises(ValueError, match="concrete weights"):
        jax.jit(lambda x: export.quantize_array(x).packed)(w)


# ------------------------------------------------------------------------- parameter trees


class TinyConvNet(nn.Module):
    """Conv → BatchNorm → ReLU → Dense: a kernel of each kind and BatchNorm statistics."""

    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.Conv(4, (3, 3), padding="SAME")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class TinyLSTM(nn.Module):
    """Embed → LSTM cell over time → Dense decoder."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 8, name="embed")(tokens)
        y = nn.RNN(nn.OptimizedLSTMCell(6, name="cell"))(x)
        return nn.Dense(20, name="decoder")(y)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(x)


@functools.partial(jax.jit, static_argnames=("bits", "per_channel"))
def _msq_params(params, bits, *, per_channel=True):
    """Every kernel and embedding rounded to its own b-bit alphabet (fake quantization)."""

    def quantize(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
            return leaf
        return _quantize(leaf, bits, per_channel=per_channel)[0]

    return jax.tree_util.tree_map_with_path(quantize, params)


@functools.cache
def _conv_variables(bits=2):
    model = TinyConvNet()
    images = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    # Non-trivial BatchNorm statistics.
    _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, images
    )
    variables = {"params": _msq_params(variables["params"], bits), **updates}
    return model, variables, images


def test_export_params_packs_only_the_masked_leaves():
    _, variables, _ = _conv_variables()
    packed = export.export_params(variables)
    assert export.is_quantized(packed["params"]["Conv_0"]["kernel"])
    assert export.is_quantized(packed["params"]["Dense_0"]["kernel"])
    for leaf in (packed["params"]["Conv_0"]["bias"], packed["batch_stats"]["BatchNorm_0"]["mean"]):
        assert isinstance(leaf, jax.Array)
    kernel = packed["params"]["Conv_0"]["kernel"]
    # The pytree's leaves are the packed codes and the scales; shape and size are static.
    assert jax.tree.leaves(kernel) == [kernel.packed, kernel.scale]
    np.testing.assert_array_equal(
        export.dequantize(packed)["params"]["Conv_0"]["kernel"],
        variables["params"]["Conv_0"]["kernel"],
    )


def test_export_params_errors_name_the_layer():
    _, variables, _ = _conv_variables()
    params = variables["params"]
    float_params = {
        **params,
        "Dense_0": {**params["Dense_0"], "kernel": params["Dense_0"]["kernel"] + 1e-3},
    }
    with pytest.raises(ValueError, match="'Dense_0/kernel' are off the alphabet"):
        export.export_params(float_params)
    nan_params = {
        **params,
        "Conv_0": {
            **params["Conv_0"],
            "kernel": params["Conv_0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan),
        },
    }
    with pytest.raises(ValueError, match="'Conv_0/kernel' contains NaN"):
        export.export_params(nan_params)
    with pytest.raises(ValueError, match=r"unknown or unmasked layers \['Conv_1/kernel'\]"):
        export.export_params(params, alphabets={"Conv_1/kernel": alphabets.binary(1.0)})
    with pytest.raises(ValueError, match="mask must have the structure of params"):
        export.export_params(params, mask={"Conv_0": True})
    # A float layer is left out through the mask, and then exports.
    mask = jax.tree.map(lambda _: False, float_params)
    mask["Conv_0"]["kernel"] = True
    packed = export.export_params(float_params, mask=mask)
    assert export.is_quantized(packed["Conv_0"]["kernel"])
    assert not export.is_quantized(packed["Dense_0"]["kernel"])


def test_export_params_uses_the_given_alphabets():
    w = jax.random.normal(jax.random.key(6), (12, 4))
    q, alphabet = _quantize(w, 3, per_channel=True)
    packed = export.export_params({"dense": {"kernel": q}}, alphabets={"dense/kernel": alphabet})
    kernel = packed["dense"]["kernel"]
    assert kernel.num_letters == alphabet.size
    np.testing.assert_array_equal(kernel.scale[0], alphabet.step)


def test_pattern_masks():
    _, variables, _ = _conv_variables()
    packed = export.export_params(variables, mask="params/Conv_0/kernel")
    assert _packed_names(packed) == {"params/Conv_0/kernel"}
    packed = export.export_params(variables, mask=".*/(kernel|embedding)")
    assert _packed_names(packed) == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    # A pattern must match a whole path: "Conv_0/kernel" names nothing in the variables.
    with pytest.raises(
        ValueError,
        match=r"mask pattern 'Conv_0/kernel' \(re.fullmatch on the leaf paths\) selects no leaf "
        "to export; leaves: batch_stats/BatchNorm_0/mean, .*, params/Dense_0/kernel",
    ):
        export.export_params(variables, mask="Conv_0/kernel")
    with pytest.raises(ValueError, match="invalid path pattern"):
        export.export_params(variables, mask="Conv_0/(kernel")
    with pytest.raises(ValueError, match=r"^mask selects no leaf to export; leaves: "):
        export.export_params(variables, mask=jax.tree.map(lambda _: False, variables))
    with pytest.raises(ValueError, match=r"default mask \(leaves named kernel or embedding\) "):
        export.export_params({"dense": {"bias": jnp.ones(3)}})


def test_nnx_alphabets_are_keyed_by_path_name():
    # NNX state paths end in the Variable's "value"; the names drop it: "kernel", not
    # "kernel/value", as for the Linen params of the same layer.
    layer = nnx.Linear(20, 6, rngs=nnx.Rngs(0))
    q, alphabet = _quantize(layer.kernel.get_value(), 2, granularity="group")
    layer.kernel.set_value(q)
    state = nnx.state(layer)
    packed = export.export_params(state, alphabets={"kernel": alphabet})
    kernel = packed["kernel"].get_value()
    assert isinstance(packed["kernel"], nnx.Param) and export.is_quantized(kernel)
    np.testing.assert_array_equal(kernel.scale, alphabet.step)
    _assert_bitwise_equal(export.dequantize(packed)["kernel"].get_value(), q)
    with pytest.raises(ValueError, match=r"unknown or unmasked layers \['kernel/value'\]"):
        export.export_params(state, alphabets={"kernel/value": alphabet})


# --------------------------------------------------------------------------------- orbax


def test_save_restore_is_bit_exact(tmp_path):
    _, variables, _ = _conv_variables()
    packed = export.export_params(variables)
    export.save(str(tmp_path / "checkpoint"), packed)
    restored = export.restore(str(tmp_path / "checkpoint"))
    assert jax.tree.structure(restored) == jax.tree.structure(packed)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(packed), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


# ------------------------------------------------------------------- quantized inference


def _assert_same_logits(apply_fn, variables, *args, mask=None):
    packed = export.export_params(variables, mask=mask)
    float_logits = jax.jit(apply_fn)(variables, *args)
    packed_apply = jax.jit(export.quantized_apply(apply_fn))
    np.testing.assert_allclose(packed_apply(packed, *args), float_logits, rtol=1e-6, atol=1e-6)
    return packed, packed_apply


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_conv_net_logits_equal_fake_quant(bits):
    model, variables, images = _conv_variables(bits)
    _assert_same_logits(model.apply, variables, images)


def test_mlp_logits_equal_fake_quant():
    model = TinyMLP()
    x = jax.random.normal(jax.random.key(7), (9, 4, 4))
    variables = jax.jit(model.init)(jax.random.key(8), x)
    variables = {**variables, "params": _msq_params(variables["params"], 1, per_channel=False)}
    _assert_same_logits(model.apply, variables, x)


def test_lstm_logits_equal_fake_quant():
    model = TinyLSTM()
    tokens = jax.random.randint(jax.random.key(9), (3, 7), 0, 20)
    variables = jax.jit(model.init)(jax.random.key(10), tokens)
    variables = {"params": _msq_params(variables["params"], 2)}
    packed, _ = _assert_same_logits(model.apply, variables, tokens)
    gate_kernels = [
        k for k in ("ii", "hf", "io") if export.is_quantized(packed["params"]["cell"][k]["kernel"])
    ]
    assert gate_kernels == ["ii", "hf", "io"]


def test_packed_apply_holds_only_packed_weights_and_does_not_recompile():
    model, variables, images = _conv_variables(2)
    packed, packed_apply = _assert_same_logits(model.apply, variables, images)
    compiled = packed_apply.lower(packed, images).compile()
    # The arguments of the compiled function are the packed tree and the images, nothing else.
    argument_bytes = compiled.memory_analysis().argument_size_in_bytes
    assert argument_bytes == export.tree_nbytes(packed) + images.nbytes
    assert export.tree_nbytes(packed) < export.tree_nbytes(variables) / 4
    # Other weights with the same layout reuse the compiled function.
    _, other_variables, _ = _conv_variables(2)
    other_variables = jax.tree.map(lambda x: 2 * x, other_variables)
    packed_apply(export.export_params(other_variables), images)
    assert packed_apply._cache_size() == 1


# The papers' models (small widths), each quantized as its experiment does.


def _apply_packed_and_float(model, inputs, quantize, *, mask=None, **kwargs):
    variables = jax.jit(functools.partial(model.init, **kwargs))(jax.random.key(12), *inputs)
    variables = {**variables, "params": jax.jit(quantize)(variables["params"])}
    apply = functools.partial(model.apply, **kwargs)
    logits = lambda v, *a: jax.tree.leaves(apply(v, *a))[0]  # the LSTM also returns its state
    return _assert_same_logits(logits, variables, *inputs, mask=mask)


def test_mnist_mlp_and_cifar_cnn_after_msq():
    images = jax.random.normal(jax.random.key(13), (4, 28, 28, 1))
    _apply_packed_and_float(MLP(hidden=(32, 16)), (images,), lambda p: _msq_params(p, 2))
    images = jax.random.normal(jax.random.key(14), (4, 32, 32, 3))
    model = CNN(stages=(4, 8), dense=16)
    _apply_packed_and_float(model, (images,), lambda p: _msq_params(p, 4), train=False)


def test_resnet20_after_proxquant_hard_binary():
    images = jax.random.normal(jax.random.key(15), (2, 32, 32, 3))
    # ProxQuant keeps the first layer, the shortcuts and the classifier in float.
    mask = transforms.mask_by_path(exclude=[".*shortcut.*", ".*conv_init/.*", ".*head/.*"])
    quantize = lambda p: transforms.hard_quantize(p, "binary", mask=mask)
    model = resnet.ResNet20()
    packed, _ = _apply_packed_and_float(model, (images,), quantize, mask=mask, train=False)
    block = packed["params"]["stage2_block1"]
    assert export.is_quantized(block["conv1"]["kernel"]) and block["conv1"]["kernel"].bits == 1
    assert not export.is_quantized(block["shortcut_conv"]["kernel"])


def test_ptb_lstm_after_msq():
    model = lstm.LSTMLanguageModel(vocab_size=50, embed_dim=12, hidden_dim=12)
    tokens = jax.random.randint(jax.random.key(16), (3, 5), 0, 50)
    inputs = (tokens, model.initial_carry(3))
    _apply_packed_and_float(model, inputs, lambda p: _msq_params(p, 1), train=False)


# ------------------------------------------------------------------------------ Flax NNX


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(nnx.relu(self.fc1(x))))


@functools.cache
def _quantized_nnx_mlp():
    module = NNXMLP(nnx.Rngs(0))
    module.norm.mean.set_value(0.1 * jnp.arange(16.0))  # non-trivial statistics
    x = jax.random.normal(jax.random.key(17), (32, 12))
    spec = LayerSpec(method="gpfq", bits=2)
    quantized, _ = qjax.quantize_model(module, x, spec=spec, progress=False)
    quantized.eval()
    return quantized, x


def _float_apply(graphdef):
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


def test_nnx_state_export_packs_exactly_the_kernels():
    module, x = _quantized_nnx_mlp()
    graphdef, state = nnx.split(module)
    packed = export.export_params(state)
    assert _packed_names(packed) == {"fc1/kernel", "fc2/kernel"}
    kernel = packed["fc1"]["kernel"].get_value()
    assert (kernel.num_letters, kernel.bits, kernel.scale.shape) == (4, 2, (1, 16))
    _assert_bitwise_equal(packed["norm"]["mean"].get_value(), state["norm"]["mean"].get_value())
    for a, b in zip(
        jax.tree.leaves(export.dequantize(packed)), jax.tree.leaves(state), strict=True
    ):
        _assert_bitwise_equal(a, b)
    apply = jax.jit(export.quantized_apply(graphdef))
    logits = apply(packed, x)
    np.testing.assert_allclose(logits, _float_apply(graphdef)(state, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, module(x), rtol=1e-5, atol=1e-5)
    # Only the packed state is held: it is the compiled function's argument, with x.
    compiled = apply.lower(packed, x).compile()
    argument_bytes = compiled.memory_analysis().argument_size_in_bytes
    assert argument_bytes == export.tree_nbytes(packed) + x.nbytes
    # nnx.state(module, nnx.Param): the params alone, applied with the rest of the state.
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    packed_params = export.export_params(params)
    assert _packed_names(packed_params) == {"fc1/kernel", "fc2/kernel"}
    np.testing.assert_array_equal(apply((packed_params, rest), x), logits)


def test_nnx_state_save_restore(tmp_path):
    module, x = _quantized_nnx_mlp()
    graphdef, state = nnx.split(module)
    packed = export.export_params(state)
    export.save(str(tmp_path / "nnx"), packed)
    restored = export.restore(str(tmp_path / "nnx"))  # the pure dict of the state
    expected = nnx.to_pure_dict(packed)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        _assert_bitwise_equal(a, b)
    apply = jax.jit(export.quantized_apply(graphdef))
    np.testing.assert_array_equal(apply(restored, x), apply(packed, x))
    nnx.replace_by_pure_dict(state, restored)
    assert _packed_names(state) == {"fc1/kernel", "fc2/kernel"}


# The transformer LM of test_engine (token embedding, DenseGeneral/LinearGeneral attention,
# MLP, a scanned stack of LAYERS blocks, an Einsum head) in Linen and NNX.


@pytest.fixture(scope="module")
def lm():
    return _linen_and_nnx_lm()


KERNELS = {f"blocks/{n}/kernel" for n in ("query", "key", "value", "out", "fc1", "fc2")}


def test_scanned_nnx_lm_group_wise(lm, tmp_path):
    _, _, module, calibration = lm
    spec = LayerSpec(method="gpfq", bits=2, group_size=4)
    quantized, _ = qjax.quantize_model(module, calibration, spec=spec, progress=False)
    graphdef, state = nnx.split(quantized)
    # The embedding stays float: the default mask (kernels and embeddings) names it.
    with pytest.raises(ValueError, match="weights of 'embed/embedding' are off the alphabet"):
        export.export_params(state, group_size=4)
    packed = export.export_params(state, mask=".*/kernel", group_size=4)
    assert _packed_names(packed) == KERNELS | {"head/kernel"}
    # One step per slice, group of 4 inputs and output column of each matrix view.
    query = packed["blocks"]["query"]["kernel"].get_value()
    assert query.shape == (LAYERS, D, HEADS, D // HEADS)
    assert (query.scale.shape, query.group_size, query.bits) == ((LAYERS, D // 4, D), 4, 2)
    fc2 = packed["blocks"]["fc2"]["kernel"].get_value()
    assert (fc2.scale.shape, fc2.group_size) == ((LAYERS, 2 * D // 4, D), 4)
    for a, b in zip(
        jax.tree.leaves(export.dequantize(packed)), jax.tree.leaves(state), strict=True
    ):
        _assert_bitwise_equal(a, b)
    tokens = calibration[0]
    apply = jax.jit(export.quantized_apply(graphdef))
    logits = apply(packed, tokens)
    np.testing.assert_allclose(logits, _float_apply(graphdef)(state, tokens), rtol=1e-6, atol=1e-6)
    # The group size travels with the checkpoint.
    export.save(str(tmp_path / "lm"), packed)
    restored = export.restore(str(tmp_path / "lm"))
    restored_query = restored["blocks"]["query"]["kernel"]
    assert (restored_query.shape, restored_query.group_size) == (query.shape, 4)
    _assert_bitwise_equal(restored_query.scale, query.scale)
    np.testing.assert_array_equal(apply(restored, tokens), logits)


def test_scanned_linen_lm_per_channel(lm):
    model, variables, _, calibration = lm
    spec = LayerSpec(method="msq", bits=3)
    quantized, _ = qjax.quantize_model(model, variables, calibration, spec=spec, progress=False)
    packed = export.export_params(quantized, mask="params/.*/kernel")
    assert _packed_names(packed) == {f"params/{name}" for name in KERNELS | {"head/kernel"}}
    blocks = packed["params"]["blocks"]
    # One 8-letter grid per slice and output channel, found without being told the layout.
    assert blocks["query"]["kernel"].scale.shape == (LAYERS, 1, HEADS, D // HEADS)
    assert blocks["out"]["kernel"].scale.shape == (LAYERS, 1, 1, D)
    assert blocks["fc1"]["kernel"].scale.shape == (LAYERS, 1, 2 * D)
    assert {blocks[n]["kernel"].num_letters for n in ("query", "out", "fc1")} == {8}
    for a, b in zip(
        jax.tree.leaves(export.dequantize(packed)), jax.tree.leaves(quantized), strict=True
    ):
        _assert_bitwise_equal(a, b)
    tokens = calibration[0]
    logits = jax.jit(export.quantized_apply(model.apply))(packed, tokens)
    np.testing.assert_allclose(
        logits, jax.jit(model.apply)(quantized, tokens), rtol=1e-6, atol=1e-6
    )
