"""Tests of `mesh=`: statistics data-parallel and GPFQ's neurons split give the unsharded codes, on
1, 8 and 2 × 4 devices.

JAX fixes its device count when it starts, so the multi-device tests (named `test_eight_devices_*`)
run in a second pytest session on 8 simulated CPU devices, which `test_on_eight_simulated_devices`
starts (`XLA_FLAGS=--xla_force_host_platform_device_count=8`); in the ordinary session they are
skipped. `test_two_processes` starts two processes of 4 devices each, joined by
`jax.distributed.initialize`, running `_two_process_worker` below.
"""

import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax import LayerSpec, alphabets, methods, quantize_model
from qjax.methods import gpfq
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.reference import gpfq_reference
from qjax.stats import (
    GramStats,
    combined,
    gram_stats,
    gram_stats_init,
    gram_stats_update,
    make_mesh,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
eight_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="runs in the 8-device session of test_on_eight_simulated_devices"
)


def _simulated_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(jax.device_count() >= 8, reason="this is the 8-device session")
def test_on_eight_simulated_devices():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "eight_devices",
        ],
        cwd=ROOT,
        env=_simulated_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


def correlated_inputs(rng, m, n0, *, noise=0.1):
    mixing = rng.normal(size=(n0, n0)) / np.sqrt(n0) + np.eye(n0)
    x = rng.normal(size=(m, n0)) @ mixing
    x_tilde = x + noise * rng.normal(size=(m, n0))
    return x.astype(np.float32), x_tilde.astype(np.float32)


def dense_problem(seed=0, m=403, n0=70, n1=45):
    """N0 = 70, N1 = 45 and m = 403 divide neither 8 devices nor the block size."""
    rng = np.random.default_rng(seed)
    x, x_tilde = correlated_inputs(rng, m, n0)
    w = rng.normal(size=(n0, n1)).astype(np.float32)
    return w, x, x_tilde


def make_alphabet(kind, w):
    if kind == "ternary":
        return alphabets.for_weights(w, c=2.0, num_letters=3)
    if kind == "4bit-per-channel":
        return alphabets.for_weights(w, c=1.0, bits=4, rule="max", per_channel=True)
    if kind == "letters-per-channel":
        radius = np.max(np.abs(w), axis=0)[:, None]
        return alphabets.from_letters(radius * np.array([-1.0, -0.2, 0.0, 0.5, 1.0]))
    if kind == "group-wise":
        return alphabets.for_weights(w, c=1.0, bits=3, rule="max", group_size=16)
    raise AssertionError(kind)


def whole(array) -> np.ndarray:
    """All of a (possibly multi-host) array, on this host."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ----------------------------------------------------------------------------------------------
# One device (the ordinary session): the same API, numerics, bad input, compilation.


def test_one_device_codes_equal_unsharded():
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet("4bit-per-channel", w)
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet, batch_size=100, mesh=make_mesh())
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet))


def test_codes_equal_numpy_reference_in_float64():
    w, x, x_tilde = dense_problem(seed=1, m=60, n0=33, n1=7)
    alphabet = make_alphabet("ternary", w)
    expected = gpfq_reference(
        w.astype(np.float64), x.astype(np.float64), x_tilde.astype(np.float64), alphabet.letters
    )
    with jax.enable_x64(True):
        q = qjax.gpfq_layer(
            w.astype(np.float64),
            x.astype(np.float64),
            x_tilde.astype(np.float64),
            alphabet,
            mesh=make_mesh(),
        )
    np.testing.assert_array_equal(q, expected)


def test_combined_statistics_match_float64_and_count_rows():
    w, x, x_tilde = dense_problem(m=257)
    stats = gram_stats_init(w.shape[0], track_error=True, mesh=make_mesh())
    for start in range(0, 257, 64):
        stats = gram_stats_update(stats, x[start : start + 64], x_tilde[start : start + 64])
    assert stats.per_device and stats.gram.shape == (1, 70, 70) and stats.count.shape == (1,)
    total = combined(stats)
    assert not total.per_device and total.gram.shape == (70, 70)
    x64, xt64 = x.astype(np.float64), x_tilde.astype(np.float64)
    for got, exact in ((total.gram, xt64.T @ xt64), (total.cross, xt64.T @ x64)):
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.max(np.abs(exact)))
    np.testing.assert_allclose(total.float_gram, x64.T @ x64, rtol=1e-4, atol=1e-2)
    assert int(total.count) == 257
    q = qjax.gpfq_from_stats(w, stats, alphabets.symmetric(2, 0.5))
    direct = np.linalg.norm(x @ w - x_tilde @ np.asarray(q)) / np.linalg.norm(x @ w)
    np.testing.assert_allclose(qjax.relative_error(w, q, stats), direct, rtol=1e-3)


def test_traced_per_device_statistics_are_combined():
    """Under jit the statistics' mesh is unknown: GPFQ reads them combined, same codes."""
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet("ternary", w)
    stats = gram_stats(x, x_tilde, mesh=make_mesh())
    q = jax.jit(lambda s: qjax.GPFQ().quantize(w, s, alphabet))(stats)
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet))


def second_calls_do_not_recompile():
    w, x, x_tilde = dense_problem()
    alphabet = alphabets.symmetric(2, 0.5)
    stats = gram_stats_init(w.shape[0], mesh=make_mesh())
    stats = gram_stats_update(stats, x[:128], x_tilde[:128])
    updates = qjax.stats._accumulate_on_mesh._cache_size()
    stats = gram_stats_update(stats, x[128:256], x_tilde[128:256])
    assert qjax.stats._accumulate_on_mesh._cache_size() == updates
    qjax.gpfq_from_stats(w, stats, alphabet)
    quantizers = gpfq._gpfq_on_mesh._cache_size()
    qjax.gpfq_from_stats(w + 0.01, stats, alphabets.symmetric(2, 0.7))
    assert gpfq._gpfq_on_mesh._cache_size() == quantizers


def test_second_calls_do_not_recompile():
    second_calls_do_not_recompile()


@eight_devices
def test_eight_devices_second_calls_do_not_recompile():
    second_calls_do_not_recompile()


def _nan_statistics(w, s, x):
    return qjax.gpfq_from_stats(w, gram_stats_update(s, x, x * np.nan), alphabets.binary(1.0))


def _per_device_statistics_off_mesh(w, s, x):
    unplaced = GramStats(*(np.asarray(a) for a in s[:3]))
    return gram_stats_update(unplaced, x, x)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, s, x: gram_stats_update(s, x[:, :5], x[:, :5]), "statistics expect"),
        (lambda w, s, x: gram_stats_update(s, x, x[:-1]), "same shape"),
        (lambda w, s, x: gram_stats_update(s, x.astype(int), x), "floating-point"),
        (lambda w, s, x: gram_stats_update(s, x[0], x[0]), "must have 2 dimensions"),
        (_nan_statistics, "stats.gram contains NaN"),
        (_per_device_statistics_off_mesh, "not laid out on a mesh"),
        (lambda w, s, x: qjax.gpfq_from_stats(w[:5], s, alphabets.binary(1.0)), "N0, N0"),
        (lambda w, s, x: qjax.gpfq_from_stats(w * np.inf, s, alphabets.binary(1.0)), "Inf"),
        (lambda w, s, x: qjax.gpfq_from_stats(w, s, "ternary"), "alphabet must be"),
        (
            lambda w, s, x: qjax.gpfq_from_stats(w, s, alphabets.binary(1.0), block_size=0),
            "block_size",
        ),
        (
            lambda w, s, x: qjax.gpfq_layer(
                w, x[:0], x[:0], alphabets.binary(1.0), mesh=make_mesh()
            ),
            "no rows",
        ),
        (lambda w, s, x: gram_stats(x[:0], x[:0], mesh=make_mesh()), "no rows"),
        (
            lambda w, s, x: gram_stats(x, x, batch_size=0, mesh=make_mesh()),
            "batch_size",
        ),
        (lambda w, s, x: gram_stats_init(0, mesh=make_mesh()), "n0"),
        (lambda w, s, x: make_mesh([]), "devices is empty"),
        (lambda w, s, x: gram_stats_init(3, mesh="cpu"), "mesh must be"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    w, x, _ = dense_problem(n0=20, n1=4, m=50)
    stats = gram_stats_init(20, mesh=make_mesh())
    with pytest.raises(ValueError, match=message):
        call(w, stats, x)


# ----------------------------------------------------------------------------------------------
# Eight simulated devices (run by test_on_eight_simulated_devices).


@eight_devices
@pytest.mark.parametrize(
    ("devices", "kind"),
    [(2, "ternary"), (3, "4bit-per-channel"), (8, "letters-per-channel"), (8, "group-wise")],
)
def test_eight_devices_dense_codes_equal_unsharded(kind, devices):
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet(kind, w)
    mesh = make_mesh(jax.devices()[:devices])
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=128, block_size=16)
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet, block_size=16))


@eight_devices
def test_eight_devices_residual_form_codes_equal_unsharded():
    w, x, x_tilde = dense_problem(m=101)
    alphabet = make_alphabet("4bit-per-channel", w)
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet, form="residual", mesh=make_mesh())
    expected = qjax.gpfq_layer(w, x, x_tilde, alphabet, form="residual")
    np.testing.assert_array_equal(q, expected)


@eight_devices
def test_eight_devices_two_axis_explicit_mesh():
    w, x, x_tilde = dense_problem(seed=4, n1=48)
    alphabet = make_alphabet("4bit-per-channel", w)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    stats = gram_stats_init(w.shape[0], mesh=mesh)
    stats = gram_stats_update(stats, x, x_tilde)
    assert stats.gram.addressable_shards[0].data.shape == (1, 70, 70)
    q = qjax.gpfq_from_stats(w, stats, alphabet)
    # N1 = 48 divides 8: the codes stay split by neuron, 6 per device.
    assert {shard.data.shape for shard in q.addressable_shards} == {(70, 6)}
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet))


@eight_devices
def test_eight_devices_rows_are_split_and_partial_sums_stay_apart():
    _, x, x_tilde = dense_problem(m=61)  # padded to 64 rows: 8 per device
    stats = gram_stats_update(gram_stats_init(70, mesh=make_mesh()), x, x_tilde)
    np.testing.assert_array_equal(stats.count, [8] * 7 + [5])
    assert int(combined(stats).count) == 61
    # Device d summed rows 8d..8d+7 only.
    for shard in stats.gram.addressable_shards:
        d = shard.index[0].start
        rows = x_tilde[8 * d : 8 * d + 8].astype(np.float64)  # the last device has 5 rows
        np.testing.assert_allclose(shard.data[0], rows.T @ rows, rtol=1e-5, atol=1e-4)


@eight_devices
def test_eight_devices_rows_committed_to_one_device_are_split():
    _, x, x_tilde = dense_problem(m=40)
    on_one = [jax.device_put(a, jax.devices()[3]) for a in (x, x_tilde)]
    stats = gram_stats_update(gram_stats_init(70, mesh=make_mesh()), *on_one)
    np.testing.assert_array_equal(stats.count, [5] * 8)
    np.testing.assert_allclose(
        combined(stats).cross, qjax.gram_stats(x, x_tilde).cross, rtol=1e-5, atol=1e-4
    )


@eight_devices
def test_eight_devices_other_methods_read_combined_statistics():
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet("4bit-per-channel", w)
    stats = gram_stats(x, x_tilde, batch_size=100, track_error=True, mesh=make_mesh())
    plain = gram_stats(x, x_tilde, track_error=True)
    for method in (qjax.GPTQ(), qjax.MSQ()):
        np.testing.assert_array_equal(
            method.quantize(w, stats, alphabet), method.quantize(w, plain, alphabet)
        )
    q = qjax.gpfq_from_stats(w, stats, alphabet)
    np.testing.assert_allclose(
        qjax.relative_error(w, q, stats), qjax.relative_error(w, q, plain), rtol=1e-5
    )


def conv_problem(groups):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(11, 8, 8, 6)).astype(np.float32)
    images_tilde = (images + 0.1 * rng.normal(size=images.shape)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 6 // groups, 12)).astype(np.float32)
    geometry = ConvGeometry((3, 3), strides=1, padding="SAME", feature_group_count=groups)
    alphabet = alphabets.for_weights(kernel, c=1.0, bits=3, rule="max", per_channel=True)
    return kernel, images, images_tilde, geometry, alphabet


@eight_devices
@pytest.mark.parametrize(
    ("groups", "options"),
    [
        (1, {}),
        (2, {}),
        (2, {"form": "residual"}),
        (1, {"patch_fraction": 0.3, "key": jax.random.key(7)}),
    ],
)
def test_eight_devices_conv_codes_equal_unsharded(groups, options):
    kernel, images, images_tilde, geometry, alphabet = conv_problem(groups)
    q = qjax.gpfq_conv(
        kernel,
        images,
        images_tilde,
        alphabet,
        geometry=geometry,
        batch_size=4,
        mesh=make_mesh(),
        **options,
    )
    expected = qjax.gpfq_conv(
        kernel, images, images_tilde, alphabet, geometry=geometry, batch_size=4, **options
    )
    np.testing.assert_array_equal(q, expected)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(20)(x))
        return nn.Dense(5)(x)


SMALL_CNN_LAYERS = ("Conv_0", "Dense_0", "Dense_1")
SMALL_CNN_SPEC = LayerSpec(bits=3, c=1.0, rule="max", per_channel=True)
# relative_error is the square root of a difference of terms ~300 times its size (float32).
ERROR_RTOL = 1e-4
SMALL_CNN_OVERRIDES = {"Dense_1": LayerSpec(method="gptq", bits=3, c=1.0, rule="max")}


def small_cnn_problem():
    """SmallCNN, 24 calibration images (as NumPy) and its initial variables."""
    model = SmallCNN()
    images = np.asarray(jax.random.normal(jax.random.key(0), (24, 6, 6, 2)))
    return model, images, model.init(jax.random.key(1), images)


def quantize_small_cnn(variables, batches, mesh):
    """SmallCNN's layers in order through the public per-layer API, as a model-level engine calls
    it: statistics over `batches` (this process's images) on `mesh`, then `method.quantize` and
    `relative_error`. Returns the kernels and the errors."""
    params = variables["params"]
    quantized = dict(params)
    geometry = ConvGeometry((3, 3))
    conv = nn.Conv(8, (3, 3))

    def hidden(p, images):
        return nn.relu(conv.apply({"params": p["Conv_0"]}, images)).reshape(images.shape[0], -1)

    def rows(p, name, images):
        if name == "Conv_0":
            return conv_patches(images, geometry)
        x = hidden(p, images)
        return x if name == "Dense_0" else nn.relu(nn.Dense(20).apply({"params": p["Dense_0"]}, x))

    errors = {}
    for name in SMALL_CNN_LAYERS:
        spec = SMALL_CNN_OVERRIDES.get(name, SMALL_CNN_SPEC)
        kernel = params[name]["kernel"]
        matrix = kernel_to_matrix(kernel, geometry) if name == "Conv_0" else kernel
        stats = gram_stats_init(
            matrix.shape[-2], batch_shape=matrix.shape[:-2], track_error=True, mesh=mesh
        )
        for images in batches:
            stats = gram_stats_update(
                stats, rows(params, name, images), rows(quantized, name, images)
            )
        q = methods.get(spec.method).quantize(matrix, stats, spec.make_alphabet(matrix))
        errors[name] = float(qjax.relative_error(matrix, q, stats))
        q = whole(q)
        quantized[name] = {
            **params[name],
            "kernel": matrix_to_kernel(q, geometry) if name == "Conv_0" else q,
        }
    return quantized, errors


@eight_devices
def test_eight_devices_whole_model_equals_quantize_model():
    """Walking SmallCNN with per-device statistics (batches of 10 and 14 images, not multiples of
    8): the kernels and errors of `qjax.quantize_model` (unsharded), for GPFQ (Conv and Dense)
    and GPTQ."""
    model, images, variables = small_cnn_problem()
    batches = [images[:10], images[10:]]
    expected, reports = quantize_model(
        model, variables, batches, spec=SMALL_CNN_SPEC, rules=SMALL_CNN_OVERRIDES, progress=False
    )
    quantized, errors = quantize_small_cnn(variables, batches, make_mesh())
    sharded, sharded_reports = quantize_model(
        model,
        variables,
        batches,
        spec=SMALL_CNN_SPEC,
        rules=SMALL_CNN_OVERRIDES,
        mesh=make_mesh(),
        progress=False,
    )
    for name, report, sharded_report in zip(
        SMALL_CNN_LAYERS, reports, sharded_reports, strict=True
    ):
        for kernels in (quantized[name]["kernel"], sharded["params"][name]["kernel"]):
            np.testing.assert_array_equal(kernels, expected["params"][name]["kernel"], name)
        assert errors[name] == pytest.approx(report.relative_error, rel=ERROR_RTOL), name
        assert sharded_report.relative_error == pytest.approx(report.relative_error, rel=ERROR_RTOL)


# ----------------------------------------------------------------------------------------------
# Two processes ("hosts") of four devices each, joined by jax.distributed.


def _two_process_worker(process_id: int) -> None:
    """One process of test_two_processes: its own rows (400 vs 603), the same codes."""
    assert jax.process_count() == 2 and jax.device_count() == 8
    w, x, x_tilde = dense_problem(m=1003)
    alphabet = make_alphabet("4bit-per-channel", w)
    expected = np.asarray(qjax.gpfq_layer(w, x, x_tilde, alphabet))
    mine = slice(0, 400) if process_id == 0 else slice(400, None)
    mesh = make_mesh()
    q = qjax.gpfq_layer(w, x[mine], x_tilde[mine], alphabet, batch_size=128, mesh=mesh)
    for shard in q.addressable_shards:
        np.testing.assert_array_equal(shard.data, expected[shard.index])
    residual = qjax.gpfq_layer(w, x[mine], x_tilde[mine], alphabet, form="residual", mesh=mesh)
    np.testing.assert_array_equal(
        whole(residual), qjax.gpfq_layer(w, x, x_tilde, alphabet, form="residual")
    )
    # A global array of 2 × 400 rows, 100 on each device.
    rows = NamedSharding(mesh, P(mesh.axis_names, None))
    half = slice(400 * process_id, 400 * process_id + 400)
    x_global, x_tilde_global = (
        jax.make_array_from_process_local_data(rows, a[half], (800, 70)) for a in (x, x_tilde)
    )
    stats = gram_stats_update(gram_stats_init(70, mesh=mesh), x_global, x_tilde_global)
    np.testing.assert_array_equal(whole(stats.count), [100] * 8)
    np.testing.assert_array_equal(
        whole(qjax.gpfq_from_stats(w, stats, alphabet)),
        qjax.gpfq_layer(w, x[:800], x_tilde[:800], alphabet),
    )
    # A whole model, each process calibrating on its own images (10 and 14).
    model, images, variables = small_cnn_problem()
    expected_model, reports = quantize_model(
        model, variables, images, spec=SMALL_CNN_SPEC, rules=SMALL_CNN_OVERRIDES, progress=False
    )
    my_images = images[:10] if process_id == 0 else images[10:]
    quantized, errors = quantize_small_cnn(variables, [my_images], mesh)
    engine, _ = quantize_model(
        model,
        variables,
        [my_images],
        spec=SMALL_CNN_SPEC,
        rules=SMALL_CNN_OVERRIDES,
        mesh=mesh,
        progress=False,
    )
    for name, report in zip(SMALL_CNN_LAYERS, reports, strict=True):
        for kernels in (quantized[name]["kernel"], engine["params"][name]["kernel"]):
            np.testing.assert_array_equal(kernels, expected_model["params"][name]["kernel"])
        assert errors[name] == pytest.approx(report.relative_error, rel=ERROR_RTOL), name
    # A mesh of this process's devices only leaves the other host's data out: an error.
    with pytest.raises(ValueError, match="host count and the data shards disagree"):
        gram_stats_init(70, mesh=make_mesh(jax.local_devices()))
    print(f"process {process_id}: codes equal", flush=True)


def test_two_processes():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    # jax.distributed.initialize comes first: importing this module already asks for devices.
    command = (
        "import jax; jax.distributed.initialize('localhost:{port}', num_processes=2, "
        "process_id={process_id}); from tests.test_sharding import _two_process_worker; "
        "_two_process_worker({process_id})"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", command.format(port=port, process_id=process_id)],
            cwd=ROOT,
            env=_simulated_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in (0, 1)
    ]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            worker.kill()
            outputs.append(worker.communicate()[0])
    for process_id, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, output[-4000:]
        assert f"process {process_id}: codes equal" in output
