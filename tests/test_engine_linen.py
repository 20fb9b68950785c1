"""qjax.quantize_model on Linen models: the sequential wiring equals hand calls of the layer
quantizers (Dense, Conv with groups and strides, BatchNorm in between)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import LayerSpec, alphabets, format_report, models, quantize_model
from qjax.adapters import linen as linen_adapter
from qjax.adapters.base import KEPT_PAIRED_PASSES
from qjax.engine import _add_rows


@pytest.fixture(scope="module")
def mlp():
    model = models.MLP(hidden=(12, 8), num_classes=5)
    x = jax.random.normal(jax.random.key(0), (96, 4, 4, 1))
    variables = model.init(jax.random.key(1), x)
    # Non-trivial BatchNorm statistics, so that BN matters in X and X~.
    stats = variables["batch_stats"]
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda s: s + 0.3 * jnp.arange(s.shape[0]) / s.shape[0], stats),
    }
    return model, variables, x


def mlp_hidden(variables, x, layer):
    """The input of Dense_<layer>, by a hand-written forward pass (BatchNorm eps 1e-5)."""
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for i in range(layer):
        dense = variables["params"][f"Dense_{i}"]
        h = np.maximum(h @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]), 0)
        bn, bn_stats = (
            variables["params"][f"BatchNorm_{i}"],
            variables["batch_stats"][f"BatchNorm_{i}"],
        )
        h = (h - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    return jnp.asarray(h, jnp.float32)


def with_kernel(variables, name, kernel):
    params = dict(variables["params"])
    params[name] = {**params[name], "kernel": kernel}
    return {**variables, "params": params}


def test_mlp_gpfq_equals_hand_calls(mlp):
    model, variables, x = mlp
    spec = LayerSpec(method="gpfq", num_letters=3, c=2.0, rule="median", per_channel=False)
    quantized, reports = quantize_model(
        model, variables, [x[:40], x[40:]], spec=spec, progress=False
    )
    partial = variables
    for layer in range(3):
        name = f"Dense_{layer}"
        w = variables["params"][name]["kernel"]
        x_float, x_tilde = mlp_hidden(variables, x, layer), mlp_hidden(partial, x, layer)
        alphabet = alphabets.for_weights(w, c=2.0, num_letters=3, rule="median")
        q = qjax.gpfq_layer(w, x_float, x_tilde, alphabet)
        np.testing.assert_allclose(quantized["params"][name]["kernel"], q, atol=1e-6)
        partial = with_kernel(partial, name, q)
    assert [r.path for r in reports] == ["Dense_0", "Dense_1", "Dense_2"]
    for name in ("Dense_0", "BatchNorm_1"):
        for key in variables["params"][name]:
            if key != "kernel":
                np.testing.assert_array_equal(
                    quantized["params"][name][key], variables["params"][name][key]
                )
    jax.tree.map(np.testing.assert_array_equal, quantized["batch_stats"], variables["batch_stats"])


def test_mlp_msq_is_rounding_and_report(mlp):
    model, variables, x = mlp
    spec = LayerSpec(method="msq", bits=3, c=1.0, rule="max", per_channel=True)
    quantized, reports = quantize_model(model, variables, x, spec=spec, progress=False)
    partial = variables
    for layer, report in enumerate(reports):
        name = f"Dense_{layer}"
        w = variables["params"][name]["kernel"]
        alphabet = alphabets.for_weights(w, c=1.0, bits=3, rule="max", per_channel=True)
        q = alphabet.project(w)
        np.testing.assert_array_equal(quantized["params"][name]["kernel"], q)
        # The reported error is ||XW − X~Q|| / ||XW|| on the float and partly rounded inputs.
        x_float, x_tilde = mlp_hidden(variables, x, layer), mlp_hidden(partial, x, layer)
        expected = np.linalg.norm(x_float @ w - x_tilde @ q) / np.linalg.norm(x_float @ w)
        assert report.method == "msq" and report.num_letters == 8
        assert report.relative_error == pytest.approx(expected, rel=1e-3)
        partial = with_kernel(partial, name, q)
    assert "| Dense_1 | Dense | 12×8 | msq | 8 |" in format_report(reports)


def test_skip_keeps_layer_float_and_pattern_order(mlp):
    model, variables, x = mlp
    quantized, reports = quantize_model(
        model,
        variables,
        x,
        spec=LayerSpec(bits=2),
        rules=[
            ("Dense_2", LayerSpec(method="skip")),
            ("Dense_.*", LayerSpec(method="gptq", bits=2)),
        ],
        progress=False,
    )
    np.testing.assert_array_equal(
        quantized["params"]["Dense_2"]["kernel"], variables["params"]["Dense_2"]["kernel"]
    )
    assert [r.method for r in reports] == ["gptq", "gptq", "skip"]
    assert reports[2].relative_error is None


def test_calibration_streaming_equals_one_batch(mlp):
    model, variables, x = mlp
    one, _ = quantize_model(model, variables, x, progress=False)
    many, _ = quantize_model(
        model, variables, lambda: (x[i : i + 32] for i in range(0, 96, 32)), progress=False
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one, many)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="VALID", feature_group_count=2)(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(x)


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
def test_cnn_equals_hand_calls(method):
    model = SmallCNN()
    x = jax.random.normal(jax.random.key(2), (10, 7, 7, 2))
    variables = model.init(jax.random.key(3), x)
    spec = LayerSpec(method=method, bits=2, c=1.0, rule="max", per_channel=True)
    quantized, reports = quantize_model(model, variables, x, spec=spec, progress=False)

    def inputs(v):
        _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
        out = state["intermediates"]
        return [
            x,
            out["BatchNorm_0"]["__call__"][0],
            jax.nn.relu(out["Conv_1"]["__call__"][0]).reshape(10, -1),
        ]

    partial = variables
    geometries = [
        qjax.patches.ConvGeometry((3, 3), padding="SAME"),
        qjax.patches.ConvGeometry((3, 3), strides=2, padding="VALID", feature_group_count=2),
    ]
    for index, name in enumerate(["Conv_0", "Conv_1", "Dense_0"]):
        w = variables["params"][name]["kernel"]
        alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
        x_float, x_tilde = inputs(variables)[index], inputs(partial)[index]
        if name.startswith("Conv"):
            geometry = geometries[index]
            if method == "gpfq":
                q = qjax.gpfq_conv(w, x_float, x_tilde, alphabet, geometry=geometry)
            else:
                patches = qjax.patches.conv_patches(x_tilde, geometry)
                groups = geometry.feature_group_count
                step = alphabet.step.reshape(groups, -1)
                q = qjax.patches.matrix_to_kernel(
                    qjax.gptq_from_stats(
                        qjax.patches.kernel_to_matrix(w, geometry),
                        qjax.gram_stats(patches, patches),
                        alphabets.UniformAlphabet(step, alphabet.size),
                    ),
                    geometry,
                )
        elif method == "gpfq":
            q = qjax.gpfq_layer(w, x_float, x_tilde, alphabet)
        else:
            q = qjax.gptq_from_stats(w, qjax.gram_stats(x_tilde, x_tilde), alphabet)
        np.testing.assert_allclose(quantized["params"][name]["kernel"], q, atol=1e-6)
        partial = with_kernel(partial, name, q)
    assert [r.kind for r in reports] == ["Conv", "Conv", "Dense"]
    assert all(
        r.relative_error <= r.msq_relative_error + 1e-6 for r in reports[1:] if method == "gpfq"
    )


class Scale(nn.Module):
    """A layer with a "kernel" that qjax does not know."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("kernel", nn.initializers.ones, (x.shape[-1],))


class WithUnknownLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(Scale(name="proj")(x))


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(5, name="twice")
        return nn.Dense(2)(dense(dense(x)))


@pytest.mark.parametrize(
    ("model", "layer", "message"),
    [
        (WithUnknownLayer(), "proj", "layer proj is a Scale"),
        (Shared(), "twice", "layer twice is called more than once"),
    ],
    ids=["unknown-type", "shared"],
)
def test_unquantizable_layer_is_named_and_skippable(model, layer, message):
    x = jnp.ones((3, 5))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=message):
        quantize_model(model, variables, x, progress=False)
    _, reports = quantize_model(
        model, variables, x, rules=[(layer, LayerSpec(method="skip"))], progress=False
    )
    assert [(r.path, r.method) for r in reports] == [(layer, "skip"), ("Dense_0", "gpfq")]


def test_bad_arguments(mlp):
    model, variables, x = mlp
    with pytest.raises(ValueError, match="match no layer"):
        quantize_model(model, variables, x, rules={"Conv_.*": LayerSpec()}, progress=False)
    with pytest.raises(ValueError, match="match no layer"):  # a glob is not a full-match regex
        quantize_model(model, variables, x, layers={"Dense_*": LayerSpec()}, progress=False)
    with pytest.raises(ValueError, match="do not fit the model"):
        quantize_model(model, variables, jnp.ones((4, 15)), progress=False)
    with pytest.raises(ValueError, match="floating point inputs or integer token ids"):
        quantize_model(model, variables, jnp.ones((4, 4, 4, 1), bool), progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        quantize_model(model, variables, iter([x]), progress=False)
    with pytest.raises(ValueError, match="differs from the first batch"):
        quantize_model(model, variables, [x, jnp.ones((4, 5, 5, 1))], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(model, variables, x.at[0, 0, 0, 0].set(jnp.nan), progress=False)
    with pytest.raises(ValueError, match="unknown quantization method 'round'"):
        LayerSpec(method="round")
    with pytest.raises(ValueError, match="variables must have a 'params' collection"):
        quantize_model(model, variables["params"], x, progress=False)


def test_second_call_does_not_recompile(mlp):
    model, variables, x = mlp
    quantize_model(model, variables, x, spec=LayerSpec(bits=2), progress=False)
    sizes = linen_adapter._layer_input._cache_size(), _add_rows._cache_size()
    quantize_model(model, variables, x, spec=LayerSpec(bits=3, c=0.5), progress=False)
    assert (linen_adapter._layer_input._cache_size(), _add_rows._cache_size()) == sizes


def test_a_sweep_keeps_only_the_latest_compiled_passes(mlp):
    """Every alphabet size is its own one-pass program; a sweep over many keeps only the most
    recently used few alive (one jit kept them all: a CIFAR-10 CNN sweep over 64 specs ran out of
    memory for compiled code after about 60), and a size used again reuses its program."""
    model, variables, x = mlp
    passes = linen_adapter._paired_pass

    def quantize(bits):
        quantize_model(model, variables, [x], spec=LayerSpec(bits=bits, c=1.0), progress=False)

    sizes = list(range(1, KEPT_PAIRED_PASSES + 3))
    for bits in sizes:
        quantize(bits)
    swept = passes.cache_info()
    assert swept.currsize == KEPT_PAIRED_PASSES
    quantize(sizes[-1])
    assert passes.cache_info()[:2] == (swept.hits + 1, swept.misses)
    quantize(sizes[0])
    assert passes.cache_info().misses == swept.misses + 1


def test_a_sweep_over_c_compiles_once_and_equals_layer_by_layer(mlp):
    """The scale constant C is data of the one-pass program: a sweep over C compiles it once,
    and each C gives the codes of the layer-by-layer schedule (C in the spec), which are GPFQ's
    with the alphabet of C = 1 scaled by C (the letters of `alphabets.for_weights(w, c=C)`)."""
    model, variables, x = mlp
    passes = linen_adapter._paired_pass
    before = passes.cache_info()
    for i, c in enumerate((0.5, 0.75, 1.25, 2.0)):
        spec = LayerSpec(bits=2, c=c, rule="median", per_channel=False)
        one, _ = quantize_model(model, variables, x, spec=spec, progress=False)
        assert passes.cache_info().misses == before.misses + 1, c
        assert passes.cache_info().hits == before.hits + i
        by_layer, reports = quantize_model(
            model, variables, x, spec=spec, one_pass=False, progress=False
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
            one["params"],
            by_layer["params"],
        )
        w = variables["params"]["Dense_0"]["kernel"]
        alphabet = alphabets.for_weights(w, c=c, bits=2, rule="median")
        np.testing.assert_allclose(reports[0].alphabet.letters, alphabet.letters, rtol=1e-6)
        q = qjax.gpfq_layer(w, mlp_hidden(variables, x, 0), mlp_hidden(variables, x, 0), alphabet)
        np.testing.assert_allclose(one["params"]["Dense_0"]["kernel"], q, atol=1e-6)


def test_conv_neurons_per_input_channel_as_in_the_paper_code():
    """conv_neurons="channel": each (input channel c, output channel) kh×kw filter is a neuron
    over channel c's patches, quantized by GPFQ against X_c alone (the paper's reference code)."""
    model = SmallCNN()
    x = jax.random.normal(jax.random.key(4), (6, 7, 7, 2))
    variables = model.init(jax.random.key(5), x)
    spec = LayerSpec(bits=2, c=2.0, rule="median", per_channel=False, conv_neurons="channel")
    quantized, reports = quantize_model(
        model,
        variables,
        x,
        spec=spec,
        rules=[("Conv_1|Dense_0", LayerSpec(method="skip"))],
        progress=False,
    )
    w = variables["params"]["Conv_0"]["kernel"]  # (3, 3, 2, 4)
    geometry = qjax.patches.ConvGeometry((3, 3), padding="SAME")
    patches = qjax.patches.conv_patches(x, geometry)[0].reshape(-1, 9, 2)  # (m, window, cin)
    alphabet = alphabets.for_weights(w, c=2.0, bits=2, rule="median")
    got = quantized["params"]["Conv_0"]["kernel"]
    for c in range(2):
        filters = w[:, :, c, :].reshape(9, 4)
        q = qjax.gpfq_layer(filters, patches[..., c], patches[..., c], alphabet)
        np.testing.assert_allclose(got[:, :, c, :].reshape(9, 4), q, atol=1e-6)
    assert reports[0].kind == "Conv" and reports[0].num_letters == 4
    with pytest.raises(ValueError, match="conv_neurons must be"):
        LayerSpec(conv_neurons="filter")


def test_mlp_qronos_equals_hand_calls(mlp):
    """Qronos reads X~ᵀX from the float and the partly quantized model, like GPFQ."""
    model, variables, x = mlp
    spec = LayerSpec(method=qjax.Qronos(damping=1e-3), bits=2, c=1.0, rule="max")
    quantized, reports = quantize_model(model, variables, x, spec=spec, progress=False)
    partial = variables
    for layer in range(3):
        name = f"Dense_{layer}"
        w = variables["params"][name]["kernel"]
        stats = qjax.gram_stats(mlp_hidden(variables, x, layer), mlp_hidden(partial, x, layer))
        alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
        q = qjax.qronos_from_stats(w, stats, alphabet, damping=1e-3)
        np.testing.assert_allclose(quantized["params"][name]["kernel"], q, atol=1e-6)
        partial = with_kernel(partial, name, q)
    assert [r.method for r in reports] == ["qronos"] * 3
