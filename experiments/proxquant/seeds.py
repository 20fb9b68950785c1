"""ProxQuant against BinaryConnect over seeds: mean ± std of the runs' accuracies and sign changes.

    python -m experiments.proxquant.seeds --output=/tmp/qjax/proxquant_fair \
        /tmp/qjax/proxquant_fair_0 /tmp/qjax/proxquant_fair_1 /tmp/qjax/proxquant_fair_2

Each argument is the workdir of one `experiments.proxquant.main` run (its results.json); the runs
must differ in config.seed alone. For the float warm start and for every method, the fields of
`FIELDS` are summarized as mean and sample standard deviation (ddof = 1) over the seeds, with
the λ each seed chose on its own validation split; the output folder gets results.json and
results.md (with the command, machine and qjax version).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Folder for the combined results.json and results.md.")
flags.mark_flags_as_required(["output"])

# Per method: (field of the run's results, label in the table).
FIELDS = (
    ("final_accuracy", "final test accuracy (%)"),
    ("final_valid_accuracy", "final validation accuracy (%)"),
    ("hard_quantized_accuracy", "hard-quantized test accuracy (%)"),
    ("sign_change", "sign changes vs warm start"),
)


def read_run(workdir: str) -> dict[str, Any]:
    """The results.json of one run's workdir."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a finished proxquant run?")
    with open(path) as file:
        return json.load(file)


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the runs (one per seed) of the float and quantized accuracies.

    Args:
      runs: results dicts of `experiments.proxquant.train.train_and_evaluate`, two or more,
        whose configs differ in `seed` alone.

    Returns:
      {"seeds", "config" (the shared config, seed removed), "float": {"test_accuracy",
      "valid_accuracy"}, "methods": {method: {field: mean_std..., "reg": [λ per seed]}}}; each
      summary is `common.mean_std`'s {"mean", "std", "values"}.

    Raises:
      ValueError: fewer than two runs, a repeated seed, configs that differ in more than the
        seed, or runs with different methods.
    """
    if len(runs) < 2:
        raise ValueError(f"mean ± std over seeds needs two or more runs, got {len(runs)}")
    seeds = [run["config"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs repeat a seed: {seeds}")
    shared = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
    for seed, run in zip(seeds[1:], runs[1:], strict=True):
        config = {k: v for k, v in run["config"].items() if k != "seed"}
        differ = sorted(k for k in shared.keys() | config.keys() if shared.get(k) != config.get(k))
        if differ:
            raise ValueError(
                f"the run of seed {seed} differs from that of seed {seeds[0]} in {differ}, not "
                "in the seed alone"
            )
        if list(run["methods"]) != list(runs[0]["methods"]):
            raise ValueError(
                f"the run of seed {seed} has methods {list(run['methods'])}, that of seed "
                f"{seeds[0]} {list(runs[0]['methods'])}"
            )
    return {
        "seeds": seeds,
        "config": shared,
        "float": {
            field: common.mean_std([run["float"][field] for run in runs])
            for field in ("test_accuracy", "valid_accuracy")
        },
        "methods": {
            method: {
                **{
                    field: common.mean_std([run["methods"][method][field] for run in runs])
                    for field, _ in FIELDS
                },
                "reg": [run["methods"][method]["reg"] for run in runs],
            }
            for method in runs[0]["methods"]
        },
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The combined results as a Markdown table: mean ± std over the seeds, λ per seed."""
    seeds = summary["seeds"]

    def cell(value: dict[str, Any], digits: int) -> str:
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"

    lines = [
        f"Mean ± standard deviation (ddof = 1) over seeds {', '.join(map(str, seeds))}; each "
        "seed chose its λ on its own validation split (λ listed by seed).",
        "",
        "| method | λ by seed | " + " | ".join(label for _, label in FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
        f"| float (warm start) | | {cell(summary['float']['test_accuracy'], 2)} "
        f"| {cell(summary['float']['valid_accuracy'], 2)} | | |",
    ]
    for method, r in summary["methods"].items():
        regs = ", ".join("" if reg is None else f"{reg:g}" for reg in r["reg"])
        cells = [cell(r[field], 3 if field == "sign_change" else 2) for field, _ in FIELDS]
        lines.append(f"| {method} | {regs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(workdirs: Sequence[str], output: str) -> dict[str, Any]:
    """Combines the runs of `workdirs` and writes results.json / results.md to `output`."""
    summary = combine([read_run(workdir) for workdir in workdirs])
    summary["workdirs"] = [os.path.abspath(w) for w in workdirs]
    os.makedirs(output, exist_ok=True)
    config = ml_collections.ConfigDict({**summary["config"], "seed": summary["seeds"]})
    return common.write_results(
        common.Workdir(os.path.abspath(output)), summary, summary_markdown(summary), config
    )


def main(argv):
    if len(argv) < 3:
        raise app.UsageError("Give the workdirs of two or more seeds' runs.")
    print(summary_markdown(run(argv[1:], FLAGS.output)))


if __name__ == "__main__":
    app.run(main)
