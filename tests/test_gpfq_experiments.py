"""End-to-end tests of experiments/gpfq: a tiny run of each config, and (slow) real MNIST."""

import pathlib

import numpy as np
import pytest

from experiments.gpfq import pipeline
from experiments.gpfq.configs import cifar10, mnist, mnist_embedded

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shrink(config):
    config.methods = ("gpfq", "msq", "gptq")
    config.num_letters = (3,)
    config.c_values = (3.0,)
    config.max_train_examples = 256
    config.max_test_examples = 128
    return config


def test_embedded_pipeline_end_to_end(tmp_path):
    config = shrink(mnist_embedded.get_config("tiny"))
    config.methods = ("gpfq", "msq", "gptq")
    config.c_values = (2.0, 4.0)
    config.width_scales = (0.05,)
    saved_epochs = []
    results = pipeline.run(
        config, str(tmp_path), on_checkpoint=lambda phase, epoch: saved_epochs.append(phase)
    )
    assert saved_epochs == ["float"] * config.epochs + ["float_w0.05"] * config.epochs
    sources = results["data_source"]
    assert set(sources) == {"train", "valid", "test"}
    assert all(source.startswith("embedded:") for source in sources.values())
    assert results["train_examples"] + results["valid_examples"] == config.max_train_examples
    assert len(results["sweep"]) == 6 and len(results["width"]) == 1
    # C is chosen on validation; the test accuracy reported is the one at that C.
    for method in config.methods:
        (chosen,) = results["chosen_on_valid"][method]
        (best,) = results["best_on_test"][method]
        rows = [r for r in results["sweep"] if r["method"] == method]
        assert chosen["valid_accuracy"] == max(r["valid_accuracy"] for r in rows)
        at_c = next(r for r in rows if r["c"] == chosen["c"])
        assert chosen["test_accuracy"] == at_c["test_accuracy"]
        assert best["test_accuracy"] == max(r["test_accuracy"] for r in rows)
    for method, layers in results["layer_errors"].items():
        assert [lay["path"] for lay in layers] == ["Dense_0", "Dense_1", "Dense_2"], method
    table = (tmp_path / "results.md").read_text()
    assert "| GPFQ |" in table and "Width decay" in table and "chosen on the validation" in table
    for name in ("accuracy_vs_bits", "accuracy_vs_c", "layer_error", "width_decay"):
        assert (tmp_path / f"mnist_mlp_{name}.png").stat().st_size > 1000
    # A second call restores the trained models instead of training again.
    saved_epochs.clear()
    again = pipeline.run(
        config, str(tmp_path), on_checkpoint=lambda phase, epoch: saved_epochs.append(phase)
    )
    assert saved_epochs == []
    assert again["float_accuracy"] == results["float_accuracy"]


def test_sweep_keeps_each_model_and_computes_only_what_a_rerun_lacks(tmp_path, monkeypatch):
    config = shrink(mnist_embedded.get_config("tiny"))
    config.methods = ("gpfq", "msq")
    config.c_values = (2.0,)
    config.width_scales = ()
    computed = []
    quantize = pipeline.quantize_and_evaluate

    def counting(*args, method, num_letters, c, **kwargs):
        computed.append((method, num_letters, c))
        if len(computed) == 2 and crash:
            raise RuntimeError("killed")  # during the second model
        return quantize(*args, method=method, num_letters=num_letters, c=c, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", counting)
    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run(config, str(tmp_path))
    crash = False
    computed.clear()
    first = pipeline.run(config, str(tmp_path))
    assert computed == [("msq", 3, 2.0)]  # the GPFQ model of the killed run is read back
    # A larger grid computes only its new models; the old rows come back unchanged.
    config.allow_config_change = True
    config.num_letters = (3, 4)
    computed.clear()
    larger = pipeline.run(config, str(tmp_path))
    assert computed == [("gpfq", 4, 2.0), ("msq", 4, 2.0)]
    old = {(r["method"], r["num_letters"]): r for r in first["sweep"]}
    for row in larger["sweep"]:
        if row["num_letters"] == 3:
            assert row == old[row["method"], 3]
    assert [r["level"] for r in larger["chosen_on_valid"]["gpfq"]] == ["ternary", "2-bit"]
    # Any other change (here the calibration set) makes every model anew.
    config.calibration_size = config.calibration_size // 2
    computed.clear()
    pipeline.run(config, str(tmp_path))
    assert len(computed) == 4


def test_cnn_pipeline_on_synthetic_cifar_files(tmp_path):
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.savez(
        data_dir / "cifar10.npz",
        x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64, dtype=np.uint8),
        x_test=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 32, dtype=np.uint8),
    )
    config = shrink(cifar10.get_config("tiny"))
    config.data_dir = str(data_dir)
    config.methods = ("gpfq", "msq")
    config.calibration_size = 16
    config.validation_size = 16
    results = pipeline.run(config, str(tmp_path / "work"))
    kinds = [lay["kind"] for lay in results["layer_errors"]["gpfq"]]
    assert kinds == ["Conv"] * 4 + ["Dense"] * 2
    assert results["width"] == []


def test_choose_uses_the_named_split():
    rows = [
        {"method": "gpfq", "num_letters": 3, "c": c, "valid_accuracy": v, "test_accuracy": t}
        for c, v, t in [(1.0, 80.0, 90.0), (2.0, 85.0, 70.0), (3.0, 85.0, 60.0)]
    ]
    assert pipeline.choose(rows, "gpfq", 3, by="valid_accuracy")["c"] == 2.0  # first of a tie
    assert pipeline.choose(rows, "gpfq", 3, by="test_accuracy")["c"] == 1.0


def test_configs_reject_unknown_variant():
    for module in (mnist, mnist_embedded, cifar10):
        with pytest.raises(ValueError, match="variant"):
            module.get_config("huge")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_real_mnist_accuracy_bounds(tmp_path):
    """The expected bounds on full MNIST (C chosen on validation): float ≥ 98 %, GPFQ ≥ MSQ, GPFQ
    4-bit within 0.5 pt, ternary within 2 pt of float."""
    config = mnist.get_config()
    config.data_dir = str(SHARED_DATA)
    config.methods = ("gpfq", "msq")
    config.num_letters = (3, 16)
    config.c_values = (2.0, 3.0, 4.0)
    config.width_scales = ()
    results = pipeline.run(config, str(tmp_path))
    float_accuracy = results["float_accuracy"]
    gpfq = {r["level"]: r["test_accuracy"] for r in results["chosen_on_valid"]["gpfq"]}
    msq = {r["level"]: r["test_accuracy"] for r in results["chosen_on_valid"]["msq"]}
    assert float_accuracy >= 98.0
    assert all(gpfq[level] >= msq[level] for level in gpfq)
    assert gpfq["4-bit"] >= float_accuracy - 0.5
    assert gpfq["ternary"] >= float_accuracy - 2.0


def test_seeds_report_mean_and_std_over_their_own_choices_of_c(tmp_path):
    """Each seed trains its own model (own workdir), chooses its own C on its own validation
    split, and the table reports the mean ± std of those seeds' test accuracies; the moved test
    images are the same for every seed."""
    config = shrink(mnist_embedded.get_config("tiny"))
    config.methods = ("gpfq", "msq")
    config.c_values = (2.0, 4.0)
    config.width_scales = ()
    config.seeds = (0, 1, 2)
    config.test_from_train = 64
    results = pipeline.run(config, str(tmp_path))
    assert results["test_examples"] == config.max_test_examples + 64
    assert results["train_examples"] + results["valid_examples"] == 256 - 64
    seeds = results["seeds"]
    assert seeds["seeds"] == [0, 1, 2]
    float_values = []
    for seed in (0, 1, 2):
        seed_results = pipeline.run(
            pipeline.with_seed(config, seed), str(tmp_path / f"seed_{seed}")
        )  # reads the seed's own workdir: nothing is trained or quantized again
        float_values.append(seed_results["float_accuracy"])
        for method in config.methods:
            [chosen] = seed_results["chosen_on_valid"][method]
            [summary] = seeds["chosen_on_valid"][method]
            assert summary["values"][seed] == chosen["test_accuracy"]
            assert summary["c"][seed] == chosen["c"]
    assert seeds["float"]["values"] == float_values
    np.testing.assert_allclose(seeds["float"]["std"], np.std(float_values, ddof=1))
    assert len(set(float_values)) > 1  # the seeds do draw different models
    [gpfq] = seeds["chosen_on_valid"]["gpfq"]
    table = (tmp_path / "results.md").read_text()
    assert f"| GPFQ | {gpfq['mean']:.2f} ± {gpfq['std']:.2f} |" in table
