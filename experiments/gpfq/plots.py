"""Plots of the GPFQ experiments (matplotlib, Agg backend): PNG files in the workdir."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHOD_STYLE = {
    "gpfq": ("GPFQ", "tab:blue"),
    "msq": ("MSQ", "tab:orange"),
    "gptq": ("GPTQ", "tab:green"),
}


def accuracy_vs_levels(results: dict, path: str) -> None:
    """Best test accuracy over C against the alphabet, one line per method, float as a line."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = results["level_labels"]
    for method, rows in results["best"].items():
        name, color = METHOD_STYLE.get(method, (method, None))
        ax.plot(labels, [row["accuracy"] for row in rows], "o-", label=name, color=color)
    ax.axhline(results["float_accuracy"], color="gray", ls="--", label="float")
    ax.set_xlabel("alphabet")
    ax.set_ylabel("test accuracy (%, best C)")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def layer_errors(results: dict, path: str) -> None:
    """Relative error ||XW - X~Q|| / ||XW|| per layer, at the best C, for each method."""
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
    ax.set_title(f"{results['title']}: {results['width_level']}, best C")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
