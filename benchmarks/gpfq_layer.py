"""Benchmark of GPFQ and GPTQ on one layer: time over the floor of the arithmetic, memory, NumPy.

The floor of a layer is what any implementation must compute, timed as one jitted program on the
same data: the statistics, two Gram products X~ᵀX~ and X~ᵀX, plus the method's own unavoidable
arithmetic, for GPFQ one (N0 × N0)·(N0 × N1) product (its blocked updates), for GPTQ the
Cholesky factor of G and one such product. For the conv layer the floor runs on patch matrices
extracted beforehand, so `gpfq_conv` pays for its patch extraction on top. Each ratio is the best
of `--repeats` rounds (at least 3 by default), the layer and its floor called in turn in each
round, and the range of the per-round ratios is printed with it:

    python -m benchmarks.gpfq_layer                 # the default sizes (minutes on 2 CPU cores)
    python -m benchmarks.gpfq_layer --small         # a quick smoke run
    python -m benchmarks.gpfq_layer --no-brevitas   # qjax only
    python -m benchmarks.gpfq_layer --conv-xla      # conv statistics: patches vs XLA convolutions

Target: every row within 1.3× its floor (dense m=20000, N0=784, N1=500; conv 3x3, 128 -> 128
channels, 256 CIFAR-sized images); peak memory of the "gram" form that does not grow with m.

The Brevitas part (needs `torch` and `brevitas`, the `brevitas` extra; skipped with a line saying
so otherwise) runs the dense layer as a user of each library runs it, from the calibration rows
to the quantized weights, on the same rows (X~ = X: a one-layer model, whose quantized and float
inputs are the same), the same int4 narrow-range per-channel scales and `--brevitas-batch` rows
per calibration batch. Brevitas: `gpfq_mode` (GPFQ, and Qronos as its `algorithm_impl`) or
`gptq_mode` around a `QuantLinear`, one forward call per batch (its hooks accumulate the
statistics), then `update()`; torch on `--threads` threads. qjax: `gpfq_layer`, or `gram_stats`
then `GPTQ().quantize` / `Qronos().quantize` (statistics included). Target: GPFQ >= 10x faster.

`--conv-xla` measures, on the conv layer alone, qjax's statistics from patches (`gpfq_conv`'s: one
image's patches extracted and folded into G and H per compiled step) against two patch-free
formulations with XLA convolutions (`lax.conv_general_dilated`, the kernel-gradient form whose
"kernel" is a whole image): nine convolutions, one per window offset k', each giving the block
column (·, k') of X~ᵀX~ and of X~ᵀX exactly; and the 5 × 5 displacement correlations
Σ_u X~[u] X~[u + d]ᵀ, Σ_u X~[u] X[u + d]ᵀ (the 81 blocks of a 3 × 3 window's G are these 25 up
to border strips, 25/81 of the product's work), timed without the border corrections, so a lower
bound of that form.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from benchmarks.timing import best_time, format_ratio, interleaved_times
from qjax import alphabets
from qjax.methods.gpfq import DEFAULT_CONV_CHUNK_ROWS, _conv_stats_update
from qjax.methods.gpfq_core import gpfq_residual
from qjax.methods.hessian import reversed_cholesky
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix
from qjax.reference import gpfq_reference
from qjax.stats import _accumulate_jit as _gram_stats_update_jit
from qjax.stats import gram_stats_init

_HIGHEST = jax.lax.Precision.HIGHEST
TARGET = 1.3
BREVITAS_TARGET = 10


@jax.jit
def gram_floor(x, x_tilde):
    """The statistics' floor: X~ᵀX~ and X~ᵀX, one jitted program."""
    return (
        jnp.matmul(x_tilde.T, x_tilde, precision=_HIGHEST),
        jnp.matmul(x_tilde.T, x, precision=_HIGHEST),
    )


@jax.jit
def gpfq_floor(x, x_tilde, w):
    """GPFQ's floor: X~ᵀX~, X~ᵀX and one (N0 × N0)·(N0 × N1) product."""
    gram, cross = gram_floor(x, x_tilde)
    return gram, jnp.matmul(cross, w, precision=_HIGHEST)


@jax.jit
def gptq_floor(x, x_tilde, w):
    """GPTQ's floor: X~ᵀX~, X~ᵀX, the Cholesky factor of G and one (N0 × N0)·(N0 × N1) product."""
    gram, cross = gram_floor(x, x_tilde)
    factor = reversed_cholesky(gram + jnp.eye(gram.shape[0], dtype=gram.dtype))
    return cross, jnp.matmul(factor, w, precision=_HIGHEST)


def dense_inputs(key, m, n0, n1):
    kx, kn, kw = jax.random.split(key, 3)
    x = jax.nn.relu(jax.random.normal(kx, (m, n0)))
    x_tilde = x + 0.05 * jax.random.normal(kn, (m, n0))
    w = 0.05 * jax.random.normal(kw, (n0, n1))
    return w, x, x_tilde


def bench_dense(m, n0, n1, rounds):
    """Interleaved times of the dense layer's floors, GPFQ and GPTQ (statistics included)."""
    w, x, x_tilde = dense_inputs(jax.random.key(0), m, n0, n1)
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    gptq = qjax.GPTQ()
    return interleaved_times(
        dict(
            gpfq_floor=lambda: gpfq_floor(x, x_tilde, w),
            gpfq=lambda: qjax.gpfq_layer(w, x, x_tilde, alphabet),
            gptq_floor=lambda: gptq_floor(x, x_tilde, w),
            gptq=lambda: gptq.quantize(w, qjax.gram_stats(x, x_tilde), alphabet),
        ),
        rounds=rounds,
    )


def conv_images(images, cin, size):
    """ReLU input images of a conv layer and their X~ = X + noise."""
    key_x, key_n, _ = jax.random.split(jax.random.key(1), 3)  # the third for bench_conv's kernel
    x = jax.nn.relu(jax.random.normal(key_x, (images, size, size, cin)))
    return x, x + 0.05 * jax.random.normal(key_n, x.shape)


def bench_conv(images, cin, cout, size, rounds):
    """Interleaved times of `gpfq_conv` and its floor on the patch matrices (extracted first)."""
    x, x_tilde = conv_images(images, cin, size)
    kernel = 0.05 * jax.random.normal(jax.random.split(jax.random.key(1), 3)[2], (3, 3, cin, cout))
    geometry = ConvGeometry((3, 3))
    alphabet = alphabets.for_weights(kernel, c=2.0, bits=2, per_channel=True)
    patches, patches_tilde = conv_patches(x, geometry)[0], conv_patches(x_tilde, geometry)[0]
    matrix = kernel_to_matrix(kernel, geometry)[0]
    times = interleaved_times(
        dict(
            gpfq_floor=lambda: gpfq_floor(patches, patches_tilde, matrix),
            gpfq=lambda: qjax.gpfq_conv(kernel, x, x_tilde, alphabet, geometry=geometry),
        ),
        rounds=rounds,
    )
    return times, matrix.shape[0], patches.shape[0]


def brevitas_layer(w):
    """A Brevitas QuantLinear holding W (torch layout N1 × N0), int4 narrow range per channel; its
    scale is fixed at the first call (max|w|/7 per output channel)."""
    import brevitas.nn as qnn
    import torch
    from brevitas.quant import Int8WeightPerChannelFloat

    n0, n1 = w.shape
    layer = qnn.QuantLinear(
        n0,
        n1,
        bias=False,
        weight_quant=Int8WeightPerChannelFloat,
        weight_bit_width=4,
        weight_scaling_impl_type="parameter_from_stats",
    )
    layer.eval()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(w).T))
        layer.quant_weight()  # fixes the scale
    return layer


def brevitas_whole_layer(name, w, batches):
    """Brevitas's `name` ("gpfq", "gptq", "qronos") as a user runs it: the mode's context around a
    one-layer model, one forward call per calibration batch (the hooks accumulate the
    statistics), then `update()`. Returns (the quantized weights (N0, N1), seconds); the layer is
    built before the clock starts."""
    import torch
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.qronos import Qronos

    model = torch.nn.Sequential(brevitas_layer(w))
    if name == "gptq":
        mode = functools.partial(gptq_mode, model)
    elif name == "gpfq":
        mode = functools.partial(gpfq_mode, model)
    else:
        mode = functools.partial(gpfq_mode, model, algorithm_impl=Qronos)
    with torch.no_grad():
        start = time.perf_counter()
        with mode() as quantizer:
            for batch in batches:
                quantizer.model(batch)
            quantizer.update()
        elapsed = time.perf_counter() - start
        return model[0].quant_weight().value.numpy().T, elapsed


def bench_brevitas(m, n0, n1, batch_rows, rounds):
    """qjax's and Brevitas's GPFQ, GPTQ and Qronos on one dense layer, whole layer each (calibration
    rows to weights), interleaved over `rounds`; prints the table rows."""
    import torch

    w, x, _ = dense_inputs(jax.random.key(3), m, n0, n1)
    scale = brevitas_layer(w).quant_weight().scale.detach().numpy()[:, 0]
    alphabet = alphabets.symmetric(7, jnp.asarray(scale))  # the same 15 letters per channel
    batches = [torch.from_numpy(np.array(x[i : i + batch_rows])) for i in range(0, m, batch_rows)]
    stats = functools.partial(qjax.gram_stats, x, x, batch_size=batch_rows)  # X~ = X
    ours = dict(
        gpfq=lambda: qjax.gpfq_layer(w, x, x, alphabet, batch_size=batch_rows),
        gptq=lambda: qjax.GPTQ().quantize(w, stats(), alphabet),
        qronos=lambda: qjax.Qronos().quantize(w, stats(), alphabet),
    )
    first_call = {}
    for name, fn in ours.items():  # compilation, outside the rounds (its time printed apart)
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first_call[name] = time.perf_counter() - start
    times = {name: ([], []) for name in ours}
    codes = {}
    for _ in range(rounds):
        for name, fn in ours.items():
            start = time.perf_counter()
            q = jax.block_until_ready(fn())
            times[name][0].append(time.perf_counter() - start)
            theirs, elapsed = brevitas_whole_layer(name, w, batches)
            times[name][1].append(elapsed)
            codes[name] = (np.asarray(q), theirs)
    error_stats = qjax.gram_stats(x, x, track_error=True)
    for name, (qjax_times, brevitas_times) in times.items():
        ours_q, theirs_q = codes[name]
        agree = float(np.mean(np.isclose(ours_q, theirs_q, rtol=1e-5, atol=0)))
        per_round = [b / a for a, b in zip(qjax_times, brevitas_times, strict=True)]
        errors = [float(qjax.relative_error(w, jnp.asarray(q), error_stats)) for q in codes[name]]
        print(
            f"| dense m={m} N0={n0} N1={n1} | {name} | {agree:.4f} | {errors[0]:.4f} | "
            f"{errors[1]:.4f} | {first_call[name]:.3f} | {min(qjax_times):.3f} | "
            f"{min(brevitas_times):.3f} | "
            f"×{min(brevitas_times) / min(qjax_times):.1f} ({min(per_round):.1f}–"
            f"{max(per_round):.1f} over {rounds} rounds) | ≥ {BREVITAS_TARGET} |"
        )


def patch_statistics(x, x_tilde, geometry):
    """G and H of a conv layer as `gpfq_conv` accumulates them: a chunk of images' patches
    extracted and folded in per compiled step (`DEFAULT_CONV_CHUNK_ROWS` patch rows)."""
    step = max(1, DEFAULT_CONV_CHUNK_ROWS // (x.shape[1] * x.shape[2]))
    stats = gram_stats_init(geometry.window_size * x.shape[-1], batch_shape=(1,))
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        stats = _conv_stats_update(
            stats, x[rows], x_tilde[rows], None, geometry=geometry, patch_fraction=None
        )
    return stats


# (C, *spatial, batch) x (batch, *spatial, C') -> (C, *window, C'): the batch and the positions
# contracted, the kernel-gradient form of a convolution.
_KERNEL_GRADIENT = ("CHWN", "IHWO", "NHWC")


def _correlate(a, b):
    return jax.lax.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=_KERNEL_GRADIENT, precision=_HIGHEST
    )


@jax.jit
def offset_convolutions(x, x_tilde):
    """X~ᵀX~ and X~ᵀX of a 3x3 "SAME" conv, exactly, as nine XLA convolutions (one per offset k'
    of the window: the block column (·, k'), rows in the kernel's (window, channel) order), no
    patch matrix."""
    size = x.shape[1:3]
    padded, padded_tilde = (jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0))) for a in (x, x_tilde))
    gram, cross = [], []
    for i, j in np.ndindex(3, 3):
        window = (slice(None), slice(i, i + size[0]), slice(j, j + size[1]))
        gram.append(_correlate(padded_tilde, padded_tilde[window]))
        cross.append(_correlate(padded_tilde, padded[window]))

    def matrix(columns):  # (C, 3, 3, C') blocks -> (9C, 9C)
        return jnp.concatenate(
            [jnp.transpose(c, (1, 2, 0, 3)).reshape(-1, c.shape[-1]) for c in columns], axis=1
        )

    return matrix(gram), matrix(cross)


@jax.jit
def displacement_correlations(x, x_tilde):
    """The 5 × 5 displacement correlations of X~ with X~ and with X (one XLA convolution each);
    without the border corrections that would turn them into G and H."""
    padded_tilde = jnp.pad(x_tilde, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return _correlate(padded_tilde, x_tilde), _correlate(padded_tilde, x)


def bench_conv_statistics(images, cin, size, rounds):
    """Interleaved times of the three ways to the conv layer's statistics; prints the table."""
    x, x_tilde = conv_images(images, cin, size)
    geometry = ConvGeometry((3, 3))
    times = interleaved_times(
        dict(
            patches=lambda: patch_statistics(x, x_tilde, geometry),
            offsets=lambda: offset_convolutions(x, x_tilde),
            displacements=lambda: displacement_correlations(x, x_tilde),
        ),
        rounds=rounds,
    )
    stats = patch_statistics(x, x_tilde, geometry)
    gram, cross = offset_convolutions(x, x_tilde)
    difference = max(
        float(jnp.max(jnp.abs(a - b[0])) / jnp.max(jnp.abs(b[0])))
        for a, b in ((gram, stats.gram), (cross, stats.cross))
    )
    print(
        f"\nconv 3x3 {cin}→{cin} statistics (G and H), {images} images {size}x{size}, "
        f"load average {os.getloadavg()[0]:.1f}; time / patches: best (per-round range)"
    )
    print("| statistics | time (s) | time / patches |")
    print("|---|---|---|")
    labels = dict(
        patches="patches, chunked (qjax)",
        offsets="9 XLA convolutions, one per window offset (exact)",
        displacements="25 displacement correlations, no border corrections (lower bound)",
    )
    for name, label in labels.items():
        print(f"| {label} | {min(times[name]):.3f} | {format_ratio(times, name, 'patches')} |")
    print(f"9 convolutions vs patches: largest difference {difference:.1e} of the largest entry")


def compiled_bytes(jitted, *args) -> int:
    """Arguments + outputs + temporaries of one compiled XLA program (its peak footprint)."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def memory_rows(n0, n1, sizes, batch_rows):
    """Peak program memory of both methods as m grows (the gram method streams `batch_rows`)."""
    w = jax.ShapeDtypeStruct((n0, n1), jnp.float32)
    alphabet = alphabets.symmetric(1, 1.0)
    rows = []
    for m in sizes:
        batch = jax.ShapeDtypeStruct((min(m, batch_rows), n0), jnp.float32)
        stats = qjax.gram_stats_init(n0)
        gram_update = compiled_bytes(_gram_stats_update_jit, stats, batch, batch)
        gram_scan = compiled_bytes(
            jax.jit(lambda w, s, a: qjax.gpfq_from_stats(w, s, a)), w, stats, alphabet
        )
        full = jax.ShapeDtypeStruct((m, n0), jnp.float32)
        residual = compiled_bytes(
            jax.jit(lambda w, x, xt, a: gpfq_residual(w, x, xt, a, dead_tol=1e-12)),
            w,
            full,
            full,
            alphabet,
        )
        rows.append((m, max(gram_update, gram_scan), residual))
    return rows


def numpy_speedup(m, n0, n1, neurons):
    """GPFQ vs the NumPy reference loop, timed on `neurons` neurons and scaled to N1 (the
    reference handles neurons one after another, so its time is linear in N1)."""
    w, x, x_tilde = (np.asarray(a, np.float64) for a in dense_inputs(jax.random.key(2), m, n0, n1))
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    start = time.perf_counter()
    gpfq_reference(w[:, :neurons], x, x_tilde, np.asarray(alphabet.letters))
    reference = (time.perf_counter() - start) * n1 / neurons
    x32, xt32, w32 = (jnp.asarray(a, jnp.float32) for a in (x, x_tilde, w))
    ours = best_time(lambda: qjax.gpfq_layer(w32, x32, xt32, alphabet))
    return reference, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per ratio")
    parser.add_argument("--no-brevitas", action="store_true", help="skip the Brevitas part")
    parser.add_argument("--brevitas-batch", type=int, default=2000, help="rows per batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (Brevitas part)")
    parser.add_argument(
        "--conv-xla",
        action="store_true",
        help="only the conv statistics: patches against XLA convolutions",
    )
    args = parser.parse_args()
    small = args.small
    dense = (2000, 196, 100) if small else (20_000, 784, 500)
    conv = (16, 32, 32, 16) if small else (256, 128, 128, 32)
    if args.conv_xla:
        images, cin, _, size = conv
        bench_conv_statistics(images, cin, size, args.repeats)
        return

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(
        "\nfloor = X~ᵀX~ + X~ᵀX + the method's own arithmetic (GPFQ: one (N0×N0)·(N0×N1) "
        "product; GPTQ: the Cholesky factor of G and one such product), one jitted program; "
        "ratio = best of the rounds (range of the per-round ratios)"
    )
    print("| layer | method | floor (s) | qjax (s) | qjax / floor | target |")
    print("|---|---|---|---|---|---|")
    m, n0, n1 = dense
    times = bench_dense(*dense, args.repeats)
    for method in ("gpfq", "gptq"):
        floor = f"{method}_floor"
        print(
            f"| dense m={m} N0={n0} N1={n1} | {method} | {min(times[floor]):.3f} | "
            f"{min(times[method]):.3f} | {format_ratio(times, method, floor)} | ≤ {TARGET} |"
        )
    images, cin, cout, size = conv
    times, n0, rows = bench_conv(images, cin, cout, size, args.repeats)
    print(
        f"| conv 3x3 {cin}→{cout}, {images} images {size}x{size} (m={rows}, N0={n0}) | gpfq | "
        f"{min(times['gpfq_floor']):.3f} | {min(times['gpfq']):.3f} | "
        f"{format_ratio(times, 'gpfq', 'gpfq_floor')} | ≤ {TARGET} |"
    )

    sizes = (5_000, 20_000, 80_000) if not small else (1_000, 4_000, 16_000)
    batch_rows = 4_096
    print(f"\nPeak memory of the compiled programs (MiB), N0={dense[1]}, N1={dense[2]}")
    print(f"(gram: statistics streamed {batch_rows} rows at a time, then the scan; residual: u_t)")
    print("| m | gram | residual |")
    print("|---|---|---|")
    for m, gram_bytes, residual_bytes in memory_rows(dense[1], dense[2], sizes, batch_rows):
        print(f"| {m} | {gram_bytes / 2**20:.1f} | {residual_bytes / 2**20:.1f} |")

    reference, ours = numpy_speedup(2_000, 196 if small else 784, 100, neurons=2 if small else 4)
    print(
        f"\nNumPy reference loop (m=2000, N1=100, timed on a few neurons and scaled): "
        f"{reference:.2f} s; qjax: {ours:.4f} s; speed-up ×{reference / ours:.0f}"
    )

    if args.no_brevitas:
        print("\nBrevitas: skipped (--no-brevitas)")
        return
    try:
        import brevitas
        import torch
    except ImportError as error:
        print(f"\nBrevitas: skipped ({error}; pip install -e '.[brevitas]' to compare)")
        return
    torch.set_num_threads(args.threads)
    print(
        f"\nBrevitas {brevitas.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}: the whole "
        f"dense layer from the rows (X~ = X, {args.brevitas_batch} rows per batch) to the "
        "weights, int4 narrow range per channel (scale max|w|/7), act_order off, GPTQ damping "
        "0.01·mean diag G, Qronos α = 1e-6; times best of the interleaved rounds, the ratio's "
        "per-round range"
    )
    print(
        "| layer | method | codes equal | qjax error | Brevitas error | qjax first call, "
        "compiling (s) | qjax (s) | Brevitas (s) | Brevitas / qjax | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    bench_brevitas(*dense, args.brevitas_batch, args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
