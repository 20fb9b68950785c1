"""Plots of the GPFQ experiments (matplotlib, Agg backend): PNG files in the workdir."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHOD_STYLE = {
    "gpfq": ("GPFQ", "tab:blue"),
    "gpfq:channel": ("GPFQ, paper's conv neurons", "tab:purple"),
    "msq": ("MSQ", "tab:orange"),
    "gptq": ("GPTQ", "tab:green"),
    "qronos": ("Qronos", "tab:red"),
}


def accuracy_vs_levels(results: dict, path: str) -> None:
    """Test accuracy at the C chosen on validation against the alphabet, one line per method."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = results["level_labels"]
    for method, rows in results["chosen_on_valid"].items():
        name, color = METHOD_STYLE.get(method, (method, None))
        ax.plot(labels, [row["test_accuracy"] for row in rows], "o-", label=name, color=color)
    ax.axhline(results["float_accuracy"], color="gray", ls="--", label="float")
    ax.set_xlabel("alphabet")
    ax.set_ylabel("test accuracy (%, C chosen on validation)")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def accuracy_vs_c(results: dict, num_letters: int, path: str) -> None:
    """Accuracy against the scale constant C at one alphabet size (the paper's C sweep): test
    accuracy solid, validation accuracy (what chooses C) dashed."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = [r for r in results["sweep"] if r["num_letters"] == num_letters]
    for method in results["chosen_on_valid"]:
        name, color = METHOD_STYLE.get(method, (method, None))
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["c"])
        cs = [r["c"] for r in mine]
        ax.plot(cs, [r["test_accuracy"] for r in mine], "o-", label=f"{name} test", color=color)
        ax.plot(cs, [r["valid_accuracy"] for r in mine], "x--", label=f"{name} valid", color=color)
    ax.axhline(results["float_accuracy"], color="gray", ls="--", label="float (test)")
    ax.set_xlabel("scale constant C")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['title']}: {rows[0]['level']}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def layer_errors(results: dict, path: str) -> None:
    """Relative error ||XW - X~Q|| / ||XW|| per layer, at the C chosen on validation."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, layers in results["layer_errors"].items():
        name, color = METHOD_STYLE.get(method, (method, None))
        ax.plot(
            [lay["path"] for lay in layers],
            [lay["relative_error"] for lay in layers],
            "o-",
            label=name,
            color=color,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.set_title(f"{results['title']}: per-layer error, {results['layer_errors_level']}")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def width_decay(results: dict, path: str) -> None:
    """Accuracy lost to quantization against the MLP width multiplier."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = results["width"]
    scales = [row["width_scale"] for row in rows]
    for method in ("gpfq", "msq"):
        name, color = METHOD_STYLE[method]
        ax.plot(
            scales,
            [row["float_accuracy"] - row[method]["accuracy"] for row in rows],
            "o-",
            label=name,
            color=color,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width multiplier (1 = 500 → 300)")
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title(f"{results['title']}: {results['width_level']}, C chosen on validation")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
