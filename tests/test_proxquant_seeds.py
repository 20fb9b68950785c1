"""Combining the seeds of the fair ProxQuant experiment (its tiny variant): mean ± std per field."""

import copy
import json
import os

import numpy as np
import pytest

from experiments.proxquant import seeds
from experiments.proxquant import train as cifar
from experiments.proxquant.configs import fair
from tests.jax_cache import compilation_cache_dir  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Workdirs and results of the tiny fair config for seeds 0 and 1 (two λ per kind)."""
    workdirs, runs = [], []
    for seed in (0, 1):
        config = fair.get_config("tiny")
        config.seed = seed
        config.methods = ("binaryconnect", "proxquant_binary")
        config.quant.reg_binary_values = config.quant.reg_binary_values[:2]
        workdir = str(tmp_path_factory.mktemp(f"seed{seed}"))
        workdirs.append(workdir)
        runs.append(cifar.train_and_evaluate(config, workdir))
    return workdirs, runs


def test_mean_and_std_of_every_field_over_the_seeds(two_seeds, tmp_path):
    workdirs, runs = two_seeds
    summary = seeds.run(workdirs, str(tmp_path))
    assert summary["seeds"] == [0, 1]
    for field in ("test_accuracy", "valid_accuracy"):
        values = [run["float"][field] for run in runs]
        assert summary["float"][field]["values"] == values
        np.testing.assert_allclose(summary["float"][field]["mean"], np.mean(values), rtol=1e-12)
        np.testing.assert_allclose(
            summary["float"][field]["std"], np.std(values, ddof=1), rtol=1e-12
        )
    assert list(summary["methods"]) == ["binaryconnect", "proxquant_binary"]
    for method, combined in summary["methods"].items():
        assert combined["reg"] == [run["methods"][method]["reg"] for run in runs]
        for field, _ in seeds.FIELDS:
            values = [run["methods"][method][field] for run in runs]
            np.testing.assert_allclose(combined[field]["mean"], np.mean(values), rtol=1e-12)
            np.testing.assert_allclose(combined[field]["std"], np.std(values, ddof=1), rtol=1e-12)
    with open(os.path.join(tmp_path, "results.json")) as file:
        written = json.load(file)
    assert written["qjax"]["version"] and written["config"]["seed"] == [0, 1]
    with open(os.path.join(tmp_path, "results.md")) as file:
        table = file.read()
    mean, std = (
        summary["methods"]["proxquant_binary"]["final_accuracy"][k] for k in ("mean", "std")
    )
    assert f"{mean:.2f} ± {std:.2f}" in table


def test_runs_that_differ_beyond_the_seed_are_refused(two_seeds):
    _, runs = two_seeds
    with pytest.raises(ValueError, match="repeat a seed"):
        seeds.combine([runs[0], runs[0]])
    other = copy.deepcopy(runs[1])
    other["config"]["depth"] = 20
    with pytest.raises(ValueError, match=r"in \['depth'\]"):
        seeds.combine([runs[0], other])
    fewer = copy.deepcopy(runs[1])
    del fewer["methods"]["binaryconnect"]
    with pytest.raises(ValueError, match="has methods"):
        seeds.combine([runs[0], fewer])
    with pytest.raises(ValueError, match="two or more runs"):
        seeds.combine(runs[:1])


def test_a_missing_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"results\.json is missing"):
        seeds.read_run(str(tmp_path))
