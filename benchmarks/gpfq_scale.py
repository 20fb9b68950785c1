"""GPFQ at scale: time over the floor, the cost curve, speed-up over devices, peak memory.

The floor of a layer is the time of jitted matmuls with GPFQ's arithmetic: the two Gram products
X~ᵀX~ and X~ᵀX, plus one (N0 × N0)·(N0 × N1) product standing for the blocked ("lazy batch")
updates of the scan. Everything is measured in this one run, on the same data:

    python -m benchmarks.gpfq_scale                # all sizes (about 10 minutes on 2 CPU cores)
    python -m benchmarks.gpfq_scale --skip-large   # without the 4096 -> 11008 layer
    python -m benchmarks.gpfq_scale --small        # a quick smoke run

Tables: (1) time / floor for m = 5k, 20k, 100k on the dense layer 784 -> 500 and for 4096 -> 11008
at m = 2048 (target <= 1.5); (2) fitted exponents of the statistics ("Gram") part and the scan
part versus m, N0 and N1; (3) speed-up of `qjax.sharding.gpfq_layer` on 2, 4 and 8 simulated CPU
devices over 1 (each in a subprocess with XLA_FLAGS; on a CPU this only shows that the sharded
program scales, not real multi-device speed); (4) peak memory of the compiled programs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from benchmarks.timing import best_time
from qjax import alphabets, sharding

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def floor_program(x, x_tilde, w):
    """The floor: X~ᵀX~, X~ᵀX and one (N0 × N0)·(N0 × N1) product, one jitted program."""
    gram = jnp.matmul(x_tilde.T, x_tilde, precision=_HIGHEST)
    cross = jnp.matmul(x_tilde.T, x, precision=_HIGHEST)
    return gram, jnp.matmul(cross, w, precision=_HIGHEST)


def layer_inputs(m, n0, n1, seed=0):
    kx, kn, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.nn.relu(jax.random.normal(kx, (m, n0)))
    x_tilde = x + 0.05 * jax.random.normal(kn, (m, n0))
    w = jax.random.normal(kw, (n0, n1)) / np.sqrt(n0)
    return w, x, x_tilde


def measure(m, n0, n1, repeats):
    """Floor, whole GPFQ, and its two parts (statistics; scan from statistics), in seconds."""
    w, x, x_tilde = layer_inputs(m, n0, n1)
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    stats = qjax.gram_stats(x, x_tilde)
    return {
        "floor": best_time(lambda: floor_program(x, x_tilde, w), repeats=repeats),
        "gpfq": best_time(lambda: qjax.gpfq_layer(w, x, x_tilde, alphabet), repeats=repeats),
        "gram": best_time(lambda: qjax.gram_stats(x, x_tilde).gram, repeats=repeats),
        "scan": best_time(lambda: qjax.gpfq_from_stats(w, stats, alphabet), repeats=repeats),
    }


def slope(sizes, times) -> float:
    """The exponent p of a least-squares fit time ≈ c·size^p."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def compiled_bytes(compiled) -> int:
    """Arguments + outputs + temporaries of one compiled program, per device."""
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def sharded_memory(m_batch, n0, n1, mesh) -> tuple[int, int]:
    """Peak per-device bytes of the sharded statistics update (one batch of m_batch rows) and of
    the sharded quantizer, compiled without running."""
    stats = jax.eval_shape(lambda: sharding.gram_stats_init(n0, mesh=mesh))
    stats = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), stats
    )
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names, None))
    batch = jax.ShapeDtypeStruct((m_batch, n0), jnp.float32, sharding=rows)
    num_rows = jax.ShapeDtypeStruct((), jnp.int32)
    update = sharding._gram_stats_update.lower(stats, batch, batch, num_rows, mesh=mesh).compile()
    w = jax.ShapeDtypeStruct((n0, n1), jnp.float32)
    quantize = sharding._gpfq_sharded.lower(
        w,
        stats,
        alphabets.symmetric(1, 1.0),
        mesh=mesh,
        block_size=qjax.gpfq.DEFAULT_BLOCK_SIZE,
        dead_tol=qjax.gpfq.DEFAULT_DEAD_TOL,
    ).compile()
    return compiled_bytes(update), compiled_bytes(quantize)


def worker(m, n0, n1, batch_rows, repeats):
    """In a subprocess with D simulated devices: sharded GPFQ time and per-device memory."""
    w, x, x_tilde = (np.asarray(a) for a in layer_inputs(m, n0, n1))
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    mesh = sharding.make_mesh()
    seconds = best_time(
        lambda: sharding.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=batch_rows),
        repeats=repeats,
    )
    update_bytes, quantize_bytes = sharded_memory(batch_rows, n0, n1, mesh)
    codes = sharding.gpfq_layer(w, x, x_tilde, alphabet, mesh=mesh, batch_size=batch_rows)
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


def run_worker(devices, sizes, batch_rows, repeats):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "benchmarks.gpfq_scale", "--worker", *map(str, sizes)]
    command += ["--batch-rows", str(batch_rows), "--repeats", str(repeats)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--skip-large", action="store_true", help="skip 4096 -> 11008")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, nargs=3, metavar=("M", "N0", "N1"), help="internal")
    parser.add_argument("--batch-rows", type=int, default=4096)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch_rows, args.repeats)
        return
    small, repeats = args.small, args.repeats
    scale = 10 if small else 1
    n0, n1 = (784 // 4, 500 // 4) if small else (784, 500)
    ms = [5_000 // scale, 20_000 // scale, 100_000 // scale]

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("\n(1) time / floor (floor = X~ᵀX~ + X~ᵀX + one (N0×N0)·(N0×N1) product, jitted)")
    print("| layer | m | floor (s) | gpfq (s) | statistics (s) | scan (s) | gpfq / floor |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for m in ms:
        rows.append((f"{n0}→{n1}", m, measure(m, n0, n1, repeats)))
    if not args.skip_large:
        large = (2048 // scale, 4096 // scale, 11008 // scale)
        rows.append((f"{large[1]}→{large[2]}", large[0], measure(*large, repeats=1)))
    for name, m, t in rows:
        print(
            f"| {name} | {m} | {t['floor']:.3f} | {t['gpfq']:.3f} | {t['gram']:.3f} | "
            f"{t['scan']:.3f} | {t['gpfq'] / t['floor']:.2f} |"
        )

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
        exponents = [slope(sizes, [t[part] for t in times]) for part in ("gram", "scan", "gpfq")]
        print(f"| {name} | {sizes} | " + " | ".join(f"{p:.2f}" for p in exponents) + " |")

    m_sharded = ms[1]
    print(
        f"\n(3) qjax.sharding.gpfq_layer on simulated CPU devices, {n0}→{n1}, m={m_sharded} "
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
    mesh = sharding.make_mesh(jax.devices()[:1])
    layers = [(n0, n1)] + ([] if args.skip_large else [(4096, 11008), (11008, 4096)])
    for k0, k1 in layers:
        update_bytes, quantize_bytes = sharded_memory(4096, k0, k1, mesh)
        print(f"| {k0}→{k1} | {update_bytes / 2**20:.0f} | {quantize_bytes / 2**20:.0f} |")


if __name__ == "__main__":
    main()
