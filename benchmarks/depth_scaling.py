"""How `quantize_model`'s time and memory grow with depth: block-wise against one pass.

A Llama-shaped NNX decoder (`qjax.models.llama.Llama`: its decoder layers are blocks in an
`nnx.List`), d = 256, at 4, 8 and 16 blocks, quantized (GPTQ, 4 bits, groups of 128; cold: one
fresh process per run, compilation included) from 16 sequences of 256 tokens, with
`schedule="block_wise"` and with the schedule "auto" would give it otherwise on this machine
("one_pass": its activations fit). Each run is a fresh subprocess; its peak resident memory is
the process's high-water mark (`VmHWM`).

    python -m benchmarks.depth_scaling            # about 15 minutes on 2 CPU cores
    python -m benchmarks.depth_scaling --small    # a quick smoke run (d = 32, 2 and 4 blocks)

Prints a table (time, peak RSS, per-block pass memory as XLA plans it) and, per schedule, the
time ratio of the deepest to the shallowest model (target for block-wise at 16/4: <= 5.0) and
the growth of peak RSS (target <= 600 MiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(depth: int, schedule: str, d: int, sequences: int, length: int) -> dict:
    """One quantization in this process: its time and this process's peak RSS."""
    import jax
    from flax import nnx

    import qjax
    from qjax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=d,
        intermediate_size=d * 8 // 3 // 16 * 16,
        num_hidden_layers=depth,
        num_attention_heads=max(d // 64, 1),
        max_position_embeddings=length,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (sequences, length), 0, config.vocab_size)
    before = _peak_rss_mib()
    start = time.perf_counter()
    _, reports = qjax.quantize_model(
        model,
        tokens,
        spec=qjax.LayerSpec(method="gptq", bits=4, group_size=min(128, d)),
        schedule=schedule,
        progress=False,
    )
    seconds = time.perf_counter() - start
    blocks = {r.block for r in reports if r.block is not None}
    return {
        "depth": depth,
        "schedule": schedule,
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
        "block_mib": max((b.memory_bytes for b in blocks), default=0) / 2**20,
        "layers": sum(r.method != "skip" for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="d = 32, 2 and 4 blocks")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(**json.loads(args.child))))
        return
    d, depths, sequences, length = (32, (2, 4), 4, 16) if args.small else (256, (4, 8, 16), 16, 256)
    rows = []
    for schedule in ("block_wise", "one_pass"):
        for depth in depths:
            spec = {
                "depth": depth,
                "schedule": schedule,
                "d": d,
                "sequences": sequences,
                "length": length,
            }
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.depth_scaling", "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {rows[-1]}", file=sys.stderr, flush=True)

    print(f"d = {d}, {sequences} × {length} calibration tokens, GPTQ 4 bits, cold runs\n")
    print("| schedule | blocks | kernels | time (s) | peak RSS (MiB) | block pass (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        block = f"{r['block_mib']:.1f}" if r["block_mib"] else "–"
        print(
            f"| {r['schedule']} | {r['depth']} | {r['layers']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {block} |"
        )
    print()
    for schedule in ("block_wise", "one_pass"):
        mine = [r for r in rows if r["schedule"] == schedule]
        shallow, deep = mine[0], mine[-1]
        ratio = deep["seconds"] / shallow["seconds"]
        growth = deep["peak_rss_mib"] - shallow["peak_rss_mib"]
        print(
            f"{schedule}: time {deep['depth']}/{shallow['depth']} blocks = {ratio:.2f} "
            f"(target <= 5.0), peak RSS growth {growth:.0f} MiB (target <= 600)"
        )


if __name__ == "__main__":
    main()
