"""Tests of qjax.sharding: the sharded GPFQ gives the unsharded codes, on 1, 8 and 2 × 4 devices.

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

import qjax
from qjax import alphabets, sharding
from qjax.model_quant import LayerSpec, quantize_model
from qjax.patches import ConvGeometry
from qjax.reference import gpfq_reference

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
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# One device (the ordinary session): the same API, numerics, bad input, compilation.


def test_one_device_codes_equal_unsharded():
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet("4bit-per-channel", w)
    q = sharding.gpfq_layer(w, x, x_tilde, alphabet, batch_size=100)
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet))


def test_codes_equal_numpy_reference_in_float64():
    w, x, x_tilde = dense_problem(seed=1, m=60, n0=33, n1=7)
    alphabet = make_alphabet("ternary", w)
    expected = gpfq_reference(
        w.astype(np.float64), x.astype(np.float64), x_tilde.astype(np.float64), alphabet.letters
    )
    with jax.enable_x64(True):
        q = sharding.gpfq_layer(
            w.astype(np.float64), x.astype(np.float64), x_tilde.astype(np.float64), alphabet
        )
    np.testing.assert_array_equal(q, expected)


def test_combined_statistics_match_float64_and_count_rows():
    w, x, x_tilde = dense_problem(m=257)
    stats = sharding.gram_stats_init(w.shape[0], track_error=True)
    for start in range(0, 257, 64):
        stats = sharding.gram_stats_update(
            stats, x[start : start + 64], x_tilde[start : start + 64]
        )
    combined = sharding.combine_stats(stats)
    x64, xt64 = x.astype(np.float64), x_tilde.astype(np.float64)
    for got, exact in ((combined.gram, xt64.T @ xt64), (combined.cross, xt64.T @ x64)):
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.max(np.abs(exact)))
    np.testing.assert_allclose(combined.float_gram, x64.T @ x64, rtol=1e-4, atol=1e-2)
    assert int(combined.count) == 257
    q = sharding.gpfq_from_stats(w, stats, alphabets.symmetric(2, 0.5))
    direct = np.linalg.norm(x @ w - x_tilde @ np.asarray(q)) / np.linalg.norm(x @ w)
    np.testing.assert_allclose(qjax.relative_error(w, q, combined), direct, rtol=1e-3)


def test_compensated_summation_of_a_million_rows_matches_float64():
    """10⁶ rows in 1000 batches: the Kahan-compensated float32 sums stay within a few ε of the
    float64 sums, where plain float32 summation of the same batch products drifts further."""
    rng = np.random.default_rng(3)
    m, n0, rows = 1_000_000, 16, 1000
    x = (rng.normal(size=(m, n0)) + 0.5).astype(np.float32)  # non-zero mean: large sums
    x_tilde = (x + 0.05 * rng.normal(size=(m, n0))).astype(np.float32)
    stats = sharding.gram_stats_init(n0)
    for start in range(0, m, rows):
        batch = slice(start, start + rows)
        stats = sharding.gram_stats_update(stats, x[batch], x_tilde[batch])
    combined = sharding.combine_stats(stats)
    plain = qjax.gram_stats(x, x_tilde, batch_size=rows)
    x64, xt64 = x.astype(np.float64), x_tilde.astype(np.float64)
    for name, exact in (("gram", xt64.T @ xt64), ("cross", xt64.T @ x64)):
        compensated_error = np.max(np.abs(getattr(combined, name) - exact) / np.abs(exact))
        plain_error = np.max(np.abs(getattr(plain, name) - exact) / np.abs(exact))
        assert compensated_error < 2e-7, (name, compensated_error)
        assert compensated_error < plain_error / 5, (name, compensated_error, plain_error)


def test_second_calls_do_not_recompile():
    w, x, x_tilde = dense_problem()
    alphabet = alphabets.symmetric(2, 0.5)
    stats = sharding.gram_stats_init(w.shape[0])
    stats = sharding.gram_stats_update(stats, x[:128], x_tilde[:128])
    updates = sharding._gram_stats_update._cache_size()
    stats = sharding.gram_stats_update(stats, x[128:256], x_tilde[128:256])
    assert sharding._gram_stats_update._cache_size() == updates
    sharding.gpfq_from_stats(w, stats, alphabet)
    quantizers = sharding._gpfq_sharded._cache_size()
    sharding.gpfq_from_stats(w + 0.01, stats, alphabets.symmetric(2, 0.7))
    assert sharding._gpfq_sharded._cache_size() == quantizers


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, s, x: sharding.gram_stats_update(s, x[:, :5], x[:, :5]), "statistics expect"),
        (lambda w, s, x: sharding.gram_stats_update(s, x, x[:-1]), "same shape"),
        (lambda w, s, x: sharding.gram_stats_update(s, x.astype(int), x), "floating-point"),
        (lambda w, s, x: sharding.gram_stats_update(s, x * np.nan, x), "x contains NaN"),
        (lambda w, s, x: sharding.gpfq_from_stats(w[:5], s, alphabets.binary(1.0)), "N0, N0"),
        (lambda w, s, x: sharding.gpfq_from_stats(w * np.inf, s, alphabets.binary(1.0)), "Inf"),
        (lambda w, s, x: sharding.gpfq_from_stats(w, s, "ternary"), "alphabet must be"),
        (
            lambda w, s, x: sharding.gpfq_from_stats(w, s, alphabets.binary(1.0), block_size=0),
            "block_size",
        ),
        (lambda w, s, x: sharding.gpfq_layer(w, x[:0], x[:0], alphabets.binary(1.0)), "no rows"),
        (
            lambda w, s, x: sharding.gpfq_layer(w, x, x, alphabets.binary(1.0), batch_size=0),
            "batch_size",
        ),
        (lambda w, s, x: sharding.gram_stats_init(0), "n0"),
        (lambda w, s, x: sharding.make_mesh([]), "devices is empty"),
        (lambda w, s, x: sharding.gram_stats_init(3, mesh="cpu"), "mesh must be"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    w, x, _ = dense_problem(n0=20, n1=4, m=50)
    stats = sharding.gram_stats_init(20)
    with pytest.raises(ValueError, match=message):
        call(w, stats, x)


# ----------------------------------------------------------------------------------------------
# Eight simulated devices (run by test_on_eight_simulated_devices).


@eight_devices
@pytest.mark.parametrize(
    ("devices", "kind"), [(2, "ternary"), (3, "4bit-per-channel"), (8, "letters-per-channel")]
)
def test_eight_devices_dense_codes_equal_unsharded(kind, devices):
    w, x, x_tilde = dense_problem()
    alphabet = make_alphabet(kind, w)
    mesh = sharding.make_mesh(jax.devices()[:devices])
    q = sharding.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=128, block_size=16)
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet, block_size=16))


@eight_devices
def test_eight_devices_two_axis_explicit_mesh():
    w, x, x_tilde = dense_problem(seed=4, n1=48)
    alphabet = make_alphabet("4bit-per-channel", w)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    stats = sharding.gram_stats_init(w.shape[0], mesh=mesh)
    stats = sharding.gram_stats_update(stats, x, x_tilde)
    assert stats.gram.total.addressable_shards[0].data.shape == (1, 70, 70)
    q = sharding.gpfq_from_stats(w, stats, alphabet)
    # N1 = 48 divides 8: the codes stay split by neuron, 6 per device.
    assert {shard.data.shape for shard in q.addressable_shards} == {(70, 6)}
    np.testing.assert_array_equal(q, qjax.gpfq_layer(w, x, x_tilde, alphabet))


@eight_devices
def test_eight_devices_rows_are_split_and_partial_sums_stay_apart():
    _, x, x_tilde = dense_problem(m=61)  # padded to 64 rows: 8 per device
    stats = sharding.gram_stats_update(sharding.gram_stats_init(70), x, x_tilde)
    assert int(stats.count) == 61
    # Device d summed rows 8d..8d+7 only.
    for shard in stats.gram.total.addressable_shards:
        d = shard.index[0].start
        rows = x_tilde[8 * d : 8 * d + 8].astype(np.float64)  # the last device has 5 rows
        np.testing.assert_allclose(shard.data[0], rows.T @ rows, rtol=1e-5, atol=1e-4)


@eight_devices
@pytest.mark.parametrize("groups", [1, 2])
def test_eight_devices_conv_codes_equal_unsharded(groups):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(11, 8, 8, 6)).astype(np.float32)
    images_tilde = (images + 0.1 * rng.normal(size=images.shape)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 6 // groups, 12)).astype(np.float32)
    geometry = ConvGeometry((3, 3), strides=1, padding="SAME", feature_group_count=groups)
    alphabet = alphabets.for_weights(kernel, c=1.0, bits=3, rule="max", per_channel=True)
    q = sharding.gpfq_conv(kernel, images, images_tilde, alphabet, geometry=geometry, batch_size=4)
    expected = qjax.gpfq_conv(kernel, images, images_tilde, alphabet, geometry=geometry)
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


def small_cnn_problem():
    """SmallCNN, 24 calibration images (as NumPy) and its initial variables."""
    model = SmallCNN()
    images = np.asarray(jax.random.normal(jax.random.key(0), (24, 6, 6, 2)))
    return model, images, model.init(jax.random.key(1), images)


@eight_devices
def test_eight_devices_whole_model_equals_quantize_model():
    """Walking the layers of a model with the sharded quantizers (X and X~ by hand) gives the
    kernels of `qjax.quantize_model` (unsharded)."""
    model, images, variables = small_cnn_problem()
    spec = SMALL_CNN_SPEC
    expected, _ = quantize_model(model, variables, images, spec=spec, progress=False)

    params = variables["params"]
    quantized = dict(params)
    conv = nn.Conv(8, (3, 3))
    kernel = params["Conv_0"]["kernel"]
    quantized["Conv_0"] = {
        **params["Conv_0"],
        "kernel": sharding.gpfq_conv(
            kernel, images, images, spec.make_alphabet(kernel), geometry=ConvGeometry((3, 3))
        ),
    }

    def hidden(p, x):
        return nn.relu(conv.apply({"params": p["Conv_0"]}, x)).reshape(x.shape[0], -1)

    x, x_tilde = hidden(params, images), hidden(quantized, images)
    for name, width in (("Dense_0", 20), ("Dense_1", 5)):
        w = params[name]["kernel"]
        q = sharding.gpfq_layer(w, x, x_tilde, spec.make_alphabet(w))
        quantized[name] = {**params[name], "kernel": q}
        dense = nn.Dense(width)
        x = nn.relu(dense.apply({"params": params[name]}, x))
        x_tilde = nn.relu(dense.apply({"params": quantized[name]}, x_tilde))
    for name in SMALL_CNN_LAYERS:
        np.testing.assert_array_equal(
            quantized[name]["kernel"], expected["params"][name]["kernel"], err_msg=name
        )


@eight_devices
def test_eight_devices_quantize_model_with_a_mesh_equals_unsharded():
    """`qjax.quantize_model(..., mesh=)` gives the kernels and errors of the unsharded run, for
    GPFQ (Conv and Dense) and GPTQ, with batches of 10 and 14 images (not multiples of 8)."""
    model, images, variables = small_cnn_problem()
    batches = [images[:10], images[10:]]
    options = dict(
        spec=SMALL_CNN_SPEC,
        layers={"Dense_1": LayerSpec(method="gptq", bits=3, c=1.0, rule="max")},
        progress=False,
    )
    expected, expected_reports = quantize_model(model, variables, batches, **options)
    quantized, reports = quantize_model(
        model, variables, batches, mesh=sharding.make_mesh(), **options
    )
    for name in SMALL_CNN_LAYERS:
        kernel = quantized["params"][name]["kernel"]
        assert len(kernel.devices()) == 1, name  # handed back whole, for the next forward pass
        np.testing.assert_array_equal(kernel, expected["params"][name]["kernel"], err_msg=name)
    for report, expected_report in zip(reports, expected_reports, strict=True):
        assert report.method == expected_report.method
        assert report.relative_error == pytest.approx(expected_report.relative_error, rel=1e-5)
        assert report.msq_relative_error == pytest.approx(
            expected_report.msq_relative_error, rel=1e-5
        )


# ----------------------------------------------------------------------------------------------
# Two processes ("hosts") of four devices each, joined by jax.distributed.


def _two_process_worker(process_id: int) -> None:
    """One process of test_two_processes: its own rows (400 vs 603), the same codes."""
    assert jax.process_count() == 2 and jax.device_count() == 8
    w, x, x_tilde = dense_problem(m=1003)
    alphabet = make_alphabet("4bit-per-channel", w)
    expected = np.asarray(qjax.gpfq_layer(w, x, x_tilde, alphabet))
    mine = slice(0, 400) if process_id == 0 else slice(400, None)
    q = sharding.gpfq_layer(w, x[mine], x_tilde[mine], alphabet, batch_size=128)
    for shard in q.addressable_shards:
        np.testing.assert_array_equal(shard.data, expected[shard.index])
    # A whole model, each process calibrating on its own images (10 and 14).
    model, images, variables = small_cnn_problem()
    spec = SMALL_CNN_SPEC
    expected_model, _ = quantize_model(model, variables, images, spec=spec, progress=False)
    my_images = images[:10] if process_id == 0 else images[10:]
    quantized, _ = quantize_model(
        model, variables, my_images, spec=spec, mesh=sharding.make_mesh(), progress=False
    )
    for name in SMALL_CNN_LAYERS:
        np.testing.assert_array_equal(
            quantized["params"][name]["kernel"], expected_model["params"][name]["kernel"]
        )
    # A mesh of this process's devices only leaves the other host's data out: an error.
    with pytest.raises(ValueError, match="host count and the data shards disagree"):
        sharding.gram_stats_init(70, mesh=sharding.make_mesh(jax.local_devices()))
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
