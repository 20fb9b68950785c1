"""Tests of qjax.patches and qjax.gpfq_conv: a conv layer is `groups` dense layers on patches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.reference import gpfq_reference

conv_settings = [
    dict(),
    dict(strides=2),
    dict(padding="VALID"),
    dict(padding="CIRCULAR"),
    dict(padding=((1, 0), (2, 1)), strides=(1, 2)),
    dict(kernel_dilation=2),
    dict(input_dilation=2, padding=1),
    dict(feature_group_count=2),
    dict(feature_group_count=4, strides=2, padding=1),
]


def init_conv(conv, images):
    return conv.init(jax.random.key(0), images)["params"]["kernel"]


@pytest.mark.parametrize("settings", conv_settings)
def test_patches_times_kernel_matrix_is_the_conv(settings):
    images = jax.random.normal(jax.random.key(1), (2, 9, 8, 4))
    conv = nn.Conv(8, (3, 2), use_bias=False, **settings)
    kernel = init_conv(conv, images)
    geometry = ConvGeometry.from_module(conv)
    patches = conv_patches(images, geometry)
    matrices = kernel_to_matrix(kernel, geometry)
    expected = conv.apply({"params": {"kernel": kernel}}, images)
    outputs = jnp.einsum("gmi,gio->mgo", patches, matrices).reshape(expected.shape)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    np.testing.assert_array_equal(matrix_to_kernel(matrices, geometry), kernel)


def test_one_and_three_spatial_dimensions():
    for shape, window in [((2, 11, 3), (3,)), ((1, 5, 6, 4, 2), (2, 3, 2))]:
        images = jax.random.normal(jax.random.key(2), shape)
        conv = nn.Conv(5, window, use_bias=False)
        kernel = init_conv(conv, images)
        geometry = ConvGeometry.from_module(conv)
        expected = conv.apply({"params": {"kernel": kernel}}, images)
        outputs = conv_patches(images, geometry)[0] @ kernel_to_matrix(kernel, geometry)[0]
        np.testing.assert_allclose(outputs.reshape(expected.shape), expected, atol=1e-5)


@pytest.mark.parametrize("settings", [dict(), dict(feature_group_count=2, strides=2)])
def test_gpfq_conv_equals_reference_on_patches(settings):
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.key(3), (3, 6, 6, 4), dtype=jnp.float64)
        images_tilde = images + 0.1 * jax.random.normal(jax.random.key(4), images.shape)
        conv = nn.Conv(6, (3, 3), use_bias=False, param_dtype=jnp.float64, **settings)
        kernel = init_conv(conv, images)
        geometry = ConvGeometry.from_module(conv)
        alphabet = alphabets.for_weights(kernel, c=2.0, bits=2, per_channel=True)
        groups = geometry.feature_group_count
        letters = np.asarray(alphabet.letters).reshape(groups, -1, alphabet.size)
        patches = np.asarray(conv_patches(images, geometry))
        patches_tilde = np.asarray(conv_patches(images_tilde, geometry))
        matrices = np.asarray(kernel_to_matrix(kernel, geometry))
        expected = np.stack(
            [
                gpfq_reference(matrices[g], patches[g], patches_tilde[g], letters[g])
                for g in range(groups)
            ]
        )
        for method in ("gram", "residual"):
            q = qjax.gpfq_conv(
                kernel, images, images_tilde, alphabet, geometry=geometry, form=method
            )
            np.testing.assert_array_equal(kernel_to_matrix(q, geometry), expected)
        # The keyword form builds the same geometry; streaming over image batches changes nothing.
        q = qjax.gpfq_conv(kernel, images, images_tilde, alphabet, batch_size=2, **settings)
        np.testing.assert_array_equal(kernel_to_matrix(q, geometry), expected)


def test_gpfq_conv_default_chunks_give_the_one_batch_codes(monkeypatch):
    # By default "gram" folds a few images at a time into G and H (about
    # DEFAULT_CONV_CHUNK_ROWS patch rows each); make that 2 images of 8x8 here: chunks 2, 2, 1.
    monkeypatch.setattr(qjax.methods.gpfq, "DEFAULT_CONV_CHUNK_ROWS", 128)
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.key(7), (5, 8, 8, 3), jnp.float64)
        images_tilde = images + 0.1 * jax.random.normal(jax.random.key(8), images.shape)
        kernel = jax.random.normal(jax.random.key(9), (3, 3, 3, 4), jnp.float64) * 0.2
        alphabet = alphabets.for_weights(kernel, c=2.0, bits=3)
        chunked = qjax.gpfq_conv(kernel, images, images_tilde, alphabet)
        whole = qjax.gpfq_conv(kernel, images, images_tilde, alphabet, batch_size=5)
        np.testing.assert_array_equal(chunked, whole)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            qjax.gpfq_conv(kernel, images, images_tilde, alphabet, batch_size=0)


def test_patch_subsampling_uses_a_fraction_of_the_patches():
    images = jax.random.normal(jax.random.key(5), (4, 8, 8, 3))
    kernel = jax.random.normal(jax.random.key(6), (3, 3, 3, 4)) * 0.2
    alphabet = alphabets.for_weights(kernel, c=2.0, bits=3)
    full = qjax.gpfq_conv(kernel, images, images, alphabet)
    sub = qjax.gpfq_conv(
        kernel, images, images, alphabet, patch_fraction=0.3, key=jax.random.key(0)
    )
    again = qjax.gpfq_conv(
        kernel, images, images, alphabet, patch_fraction=0.3, key=jax.random.key(0)
    )
    np.testing.assert_array_equal(sub, again)
    assert sub.shape == kernel.shape
    assert 0.5 < np.mean(np.asarray(sub) == np.asarray(full)) < 1.0
    assert np.all(np.isin(np.asarray(sub), np.asarray(alphabet.letters)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda k, x: qjax.gpfq_conv(
                k[0], x, x, alphabets.binary(1.0), geometry=ConvGeometry((3, 3))
            ),
            "kernel must have shape",
        ),
        (lambda k, x: qjax.gpfq_conv(k, x[..., :2], x[..., :2], alphabets.binary(1.0)), "x must"),
        (lambda k, x: qjax.gpfq_conv(k, x, x[:1], alphabets.binary(1.0)), "same shape"),
        (lambda k, x: qjax.gpfq_conv(k, x, x, alphabets.binary(1.0), padding="CAUSAL"), "CAUSAL"),
        (
            lambda k, x: qjax.gpfq_conv(k, x, x, alphabets.binary(1.0), patch_fraction=0.5),
            "needs a PRNG key",
        ),
        (
            lambda k, x: qjax.gpfq_conv(k, x, x * np.nan, alphabets.binary(1.0)),
            "x_tilde contains NaN",
        ),
        (lambda k, x: qjax.gpfq_conv(k, x, x, alphabets.binary(1.0), form="?"), "unknown form"),
    ],
)
def test_bad_conv_input_raises(call, message):
    kernel = jnp.ones((3, 3, 3, 4)) * 0.1
    images = jnp.ones((2, 5, 5, 3))
    with pytest.raises(ValueError, match=message):
        call(kernel, images)


def test_geometry_rejects_bad_settings():
    with pytest.raises(ValueError, match="kernel_size"):
        ConvGeometry(kernel_size=(0, 3))
    with pytest.raises(ValueError, match="strides"):
        ConvGeometry(kernel_size=(3, 3), strides=(1, 2, 3))
    with pytest.raises(ValueError, match="feature groups"):
        conv_patches(jnp.ones((1, 4, 4, 3)), ConvGeometry((3, 3), feature_group_count=2))
    with pytest.raises(ValueError, match=r"not an nn\.Conv"):
        ConvGeometry.from_module(nn.Dense(3))
