"""GPFQ at scale: time over the floor, the cost curve, speed-up over devices, peak memory.

The floor of a layer is the time of jitted matmuls with GPFQ's arithmetic: the two Gram products
X~ᵀX~ and X~ᵀX, plus one (N0 × N0)·(N0 × N1) product standing for the blocked ("lazy batch")
updates of the scan (for GPTQ also the Cholesky factor of G). Everything is measured in this
one run, on the same data:

    python -m benchmarks.gpfq_scale                # all sizes (about 10 minutes on 2 CPU cores)
    python -m benchmarks.gpfq_scale --skip-large   # without 4096 -> 11008 and 11008 -> 4096
    python -m benchmarks.gpfq_scale --small        # a quick smoke run
    python -m benchmarks.gpfq_scale --summation    # only table (5), about 2 minutes
    python -m benchmarks.gpfq_scale --ratios       # only table (1)

Tables: (1) time / floor for m = 5k, 20k, 100k on the dense layer 784 -> 500 and for 4096 -> 11008
(GPFQ and GPTQ) and 11008 -> 4096 at m = 2048 (target <= 1.3), each ratio the best of
`--repeats` interleaved rounds with the range of the per-round ratios; (2) fitted exponents of
the statistics ("Gram") part and the scan part versus m, N0 and N1; (3) speed-up of
`qjax.gpfq_layer(..., mesh=)` on 2, 4 and 8 simulated CPU devices over 1 (each in a subprocess
with XLA_FLAGS; on a CPU this only shows that the sharded program scales, not real multi-device
speed); (4) peak memory of the compiled programs; (5) the summation scheme of the statistics,
plain float32 (qjax's) against Kahan-compensated: error against float64 over 10^6 rows, GPFQ
codes, and the time of the accumulation.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from benchmarks.gpfq_layer import gpfq_floor, gptq_floor
from benchmarks.timing import best_time, format_ratio, interleaved_times
from qjax import alphabets, stats
from qjax.methods import gpfq

_HIGHEST = jax.lax.Precision.HIGHEST


def layer_inputs(m, n0, n1, seed=0):
    kx, kn, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.nn.relu(jax.random.normal(kx, (m, n0)))
    x_tilde = x + 0.05 * jax.random.normal(kn, (m, n0))
    w = jax.random.normal(kw, (n0, n1)) / np.sqrt(n0)
    return w, x, x_tilde


def measure(m, n0, n1, rounds, *, gptq=False):
    """Interleaved times (lists over rounds) of the floor, whole GPFQ, and its two parts
    (statistics; scan from statistics); with `gptq`, GPTQ's floor and whole layer too."""
    w, x, x_tilde = layer_inputs(m, n0, n1)
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    stats = qjax.gram_stats(x, x_tilde)
    fns = dict(
        floor=lambda: gpfq_floor(x, x_tilde, w),
        gpfq=lambda: qjax.gpfq_layer(w, x, x_tilde, alphabet),
        gram=lambda: qjax.gram_stats(x, x_tilde).gram,
        scan=lambda: qjax.gpfq_from_stats(w, stats, alphabet),
    )
    if gptq:
        method = qjax.GPTQ()
        fns["gptq_floor"] = lambda: gptq_floor(x, x_tilde, w)
        fns["gptq"] = lambda: method.quantize(w, qjax.gram_stats(x, x_tilde), alphabet)
    return interleaved_times(fns, rounds=rounds)


def slope(sizes, times) -> float:
    """The exponent p of a least-squares fit time ≈ c·size^p."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def compiled_bytes(compiled) -> int:
    """Arguments + outputs + temporaries of one compiled program, per device."""
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def sharded_memory(m_batch, n0, n1, mesh) -> tuple[int, int]:
    """Peak per-device bytes of the statistics update on `mesh` (one batch of m_batch rows) and of
    GPFQ from its per-device statistics, compiled without running."""
    partial = jax.eval_shape(lambda: stats.gram_stats_init(n0, mesh=mesh))
    partial = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), partial
    )
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names, None))
    batch = jax.ShapeDtypeStruct((m_batch, n0), jnp.float32, sharding=rows)
    rows_per_device = jax.ShapeDtypeStruct((mesh.size,), jnp.int32)
    update = stats._accumulate_on_mesh.lower(
        partial, batch, batch, rows_per_device, mesh=mesh
    ).compile()
    w = jax.ShapeDtypeStruct((n0, n1), jnp.float32)
    quantize = gpfq._gpfq_on_mesh.lower(
        w,
        partial,
        alphabets.symmetric(1, 1.0),
        mesh=mesh,
        block_size=gpfq.DEFAULT_BLOCK_SIZE,
        dead_tol=gpfq.DEFAULT_DEAD_TOL,
    ).compile()
    return compiled_bytes(update), compiled_bytes(quantize)


def worker(m, n0, n1, batch_rows, repeats):
    """In a subprocess with D simulated devices: sharded GPFQ time and per-device memory."""
    w, x, x_tilde = (np.asarray(a) for a in layer_inputs(m, n0, n1))
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    mesh = stats.make_mesh()
    seconds = best_time(
        lambda: qjax.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=batch_rows),
        repeats=repeats,
    )
    update_bytes, quantize_bytes = sharded_memory(batch_rows, n0, n1, mesh)
    codes = qjax.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=batch_rows)
    reference = qjax.gpfq_layer(w, x, x_tilde, alphabet)
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "seconds": seconds,
                "update_bytes": update_bytes,
                "quantize_bytes": quantize_bytes,
                "codes_equal": float(np.mean(np.asarray(codes) == np.asarray(reference))),
            }
        )
    )


def _kahan_accumulate(running, x, x_tilde):
    """The alternative measured in (5): G and H summed with Kahan compensation; `running` holds
    (total, compensation) pairs, the exact sums being ≈ total - compensation."""
    out = []
    for (total, compensation), product in zip(running, _products(x, x_tilde), strict=True):
        corrected = product - compensation
        new_total = total + corrected
        out.append((new_total, (new_total - total) - corrected))
    return tuple(out)


def _products(x, x_tilde):
    return (
        jnp.matmul(x_tilde.T, x_tilde, precision=_HIGHEST),
        jnp.matmul(x_tilde.T, x, precision=_HIGHEST),
    )


def summation(small: bool, repeats: int):
    """Table (5): plain float32 summation (qjax.stats.accumulate) against Kahan's."""
    n0, rows, m = 128, 256, 100_000 if small else 1_000_000

    @jax.jit
    def batch(i):
        kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(0), i))
        x = jax.nn.relu(jax.random.normal(kx, (rows, n0)) + 0.3)  # ReLU features: large sums
        return x, x + 0.05 * jax.random.normal(kn, (rows, n0))

    plain_step = jax.jit(stats.accumulate, donate_argnums=0)
    kahan_step = jax.jit(_kahan_accumulate, donate_argnums=0)
    plain = stats.gram_stats_init(n0)
    kahan = _kahan_init(n0)
    exact = [np.zeros((n0, n0)), np.zeros((n0, n0))]
    for i in range(-(-m // rows)):
        x, x_tilde = batch(i)
        plain, kahan = plain_step(plain, x, x_tilde), kahan_step(kahan, x, x_tilde)
        x64, x_tilde64 = np.asarray(x, np.float64), np.asarray(x_tilde, np.float64)
        exact[0] += x_tilde64.T @ x_tilde64
        exact[1] += x_tilde64.T @ x64
    kahan = [total - compensation for total, compensation in kahan]
    print(f"\n(5) summation of G and H: {m} rows, N0 = {n0}, batches of {rows}, vs float64")
    print("| scheme | G: relative Frobenius error | G: worst entry | H: Frobenius | H: worst |")
    print("|---|---|---|---|---|")
    for name, (gram, cross) in (("plain (qjax)", (plain.gram, plain.cross)), ("Kahan", kahan)):
        errors = []
        for got, ref in ((gram, exact[0]), (cross, exact[1])):
            diff = np.asarray(got, np.float64) - ref
            errors += [np.linalg.norm(diff) / np.linalg.norm(ref), np.max(np.abs(diff / ref))]
        print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")

    w = np.asarray(jax.random.normal(jax.random.key(1), (n0, 512))) / np.sqrt(n0)
    alphabet = alphabets.for_weights(w, c=1.0, bits=4, rule="max", per_channel=True)
    count = jnp.int32(m)
    with jax.enable_x64(True):
        exact_codes = np.asarray(
            qjax.gpfq_from_stats(w, qjax.GramStats(*map(jnp.asarray, exact), count), alphabet)
        ).astype(np.float32)
    rounded = [a.astype(np.float32) for a in exact]
    print(f"GPFQ 4-bit codes ({n0} × 512) unlike those from float64 statistics: ", end="")
    for name, (gram, cross) in (
        ("plain", (plain.gram, plain.cross)),
        ("Kahan", kahan),
        ("float64 rounded to float32", rounded),
    ):
        q = qjax.gpfq_from_stats(
            w, qjax.GramStats(jnp.asarray(gram), jnp.asarray(cross), count), alphabet
        )
        print(f"{name} {int(np.sum(np.asarray(q) != exact_codes))}", end="; ")

    print("\n| N0 | plain (CPU ms / batch) | Kahan (CPU ms / batch) | Kahan / plain |")
    print("|---|---|---|---|")
    for width in (196, 392) if small else (784, 2048):
        xs = jax.random.normal(jax.random.key(width), (16, rows, width))
        batches = list(zip(xs, xs + 0.05, strict=True))
        plain_time = _seconds_per_batch(
            plain_step, functools.partial(stats.gram_stats_init, width), batches, repeats
        )
        kahan_time = _seconds_per_batch(
            kahan_step, functools.partial(_kahan_init, width), batches, repeats
        )
        print(
            f"| {width} | {1e3 * plain_time:.2f} | {1e3 * kahan_time:.2f} | "
            f"{kahan_time / plain_time:.2f} |"
        )


def _kahan_init(n0):
    return tuple((jnp.zeros((n0, n0)), jnp.zeros((n0, n0))) for _ in range(2))


def _seconds_per_batch(step, init, batches, repeats) -> float:
    """CPU seconds (all threads of this process) of accumulating `batches` with `step` from
    `init()`, per batch, the least of `repeats` runs after a warm-up: CPU time is less disturbed
    than wall time by other jobs on a shared machine."""

    def accumulate_all():
        running = init()
        for x, x_tilde in batches:
            running = step(running, x, x_tilde)
        return jax.block_until_ready(running)

    accumulate_all()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        accumulate_all()
        times.append(time.process_time() - start)
    return min(times) / len(batches)


def run_worker(devices, sizes, batch_rows, repeats):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "benchmarks.gpfq_scale", "--worker", *map(str, sizes)]
    command += ["--batch-rows", str(batch_rows), "--repeats", str(repeats)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--skip-large", action="store_true", help="skip the LLM-sized layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, nargs=3, metavar=("M", "N0", "N1"), help="internal")
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--summation", action="store_true", help="only table (5)")
    parser.add_argument("--ratios", action="store_true", help="only table (1)")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch_rows, args.repeats)
        return
    if args.summation:
        summation(args.small, args.repeats)
        return
    small, repeats = args.small, args.repeats
    scale = 10 if small else 1
    n0, n1 = (784 // 4, 500 // 4) if small else (784, 500)
    ms = [5_000 // scale, 20_000 // scale, 100_000 // scale]

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        "\n(1) time / floor (floor = X~ᵀX~ + X~ᵀX + one (N0×N0)·(N0×N1) product, jitted; for "
        "GPTQ also the Cholesky factor of G); ratio = best of the rounds (per-round range)"
    )
    print("| layer | m | method | floor (s) | qjax (s) | statistics (s) | scan (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for m in ms:
        rows.append((f"{n0}→{n1}", m, measure(m, n0, n1, repeats)))
    if not args.skip_large:
        for k0, k1, gptq in ((4096, 11008, True), (11008, 4096, False)):
            large = (2048 // scale, k0 // scale, k1 // scale)
            rows.append((f"{large[1]}→{large[2]}", large[0], measure(*large, repeats, gptq=gptq)))
    for name, m, t in rows:
        best = {part: min(times) for part, times in t.items()}
        print(
            f"| {name} | {m} | gpfq | {best['floor']:.3f} | {best['gpfq']:.3f} | "
            f"{best['gram']:.3f} | {best['scan']:.3f} | {format_ratio(t, 'gpfq', 'floor')} |"
        )
        if "gptq" in t:
            print(
                f"| {name} | {m} | gptq | {best['gptq_floor']:.3f} | {best['gptq']:.3f} | | | "
                f"{format_ratio(t, 'gptq', 'gptq_floor')} |"
            )

    if args.ratios:
        return

    print("\n(2) cost curve: fitted exponents p of time ∝ size^p (other sizes fixed)")
    print("| varied | sizes | statistics part | scan part | whole |")
    print("|---|---|---|---|---|")
    by_m = [t for _, _, t in rows[: len(ms)]]
    curves = [("m", ms, by_m)]
    n0s = [n0 // 2, n0, 2 * n0]
    curves.append(("N0", n0s, [measure(ms[0], k, n1, repeats) for k in n0s]))
    n1s = [n1 // 2, n1, 2 * n1]
    curves.append(("N1", n1s, [measure(ms[0], n0, k, repeats) for k in n1s]))
    for name, sizes, times in curves:
        exponents = [
            slope(sizes, [min(t[part]) for t in times]) for part in ("gram", "scan", "gpfq")
        ]
        print(f"| {name} | {sizes} | " + " | ".join(f"{p:.2f}" for p in exponents) + " |")

    m_sharded = ms[1]
    print(
        f"\n(3) qjax.gpfq_layer(..., mesh=) on simulated CPU devices, {n0}→{n1}, m={m_sharded} "
        f"in batches of {args.batch_rows} rows (this machine has {os.cpu_count()} CPU cores)"
    )
    print(
        "| devices | time (s) | speed-up vs 1 | MiB/device: update | quantize | codes = unsharded |"
    )
    print("|---|---|---|---|---|---|")
    results = [run_worker(d, (m_sharded, n0, n1), args.batch_rows, repeats) for d in (1, 2, 4, 8)]
    for r in results:
        print(
            f"| {r['devices']} | {r['seconds']:.3f} | {results[0]['seconds'] / r['seconds']:.2f} | "
            f"{r['update_bytes'] / 2**20:.1f} | {r['quantize_bytes'] / 2**20:.1f} | "
            f"{100 * r['codes_equal']:.3f}% |"
        )

    print("\n(4) peak memory of the compiled programs on 1 device (MiB), independent of m")
    print("| layer | statistics update, 4096 rows | quantize from statistics |")
    print("|---|---|---|")
    mesh = stats.make_mesh(jax.devices()[:1])
    layers = [(n0, n1)] + ([] if args.skip_large else [(4096, 11008), (11008, 4096)])
    for k0, k1 in layers:
        update_bytes, quantize_bytes = sharded_memory(4096, k0, k1, mesh)
        print(f"| {k0}→{k1} | {update_bytes / 2**20:.0f} | {quantize_bytes / 2**20:.0f} |")

    summation(small, repeats)


if __name__ == "__main__":
    main()
