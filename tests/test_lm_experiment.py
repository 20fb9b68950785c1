"""Tests of experiments/lm: the tiny run end to end, batches, resume, the float model, configs."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import qjax
from experiments import common
from experiments.lm import pipeline, ptq
from experiments.lm.configs import ptb, ptb_long, tiny
from qjax import data, transforms
from qjax.models import transformer


def small_config(**model):
    """The tiny config made smaller still: a few seconds per epoch."""
    config = tiny.get_config()
    config.model.update(num_layers=1, d_model=32, mlp_dim=64, num_heads=2, **model)
    config.batch_size = 64
    return config


def test_tiny_run_end_to_end(tmp_path):
    config = tiny.get_config()
    results = pipeline.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["float"] == results["float"]
    assert saved["corpus"]["source"] == "package:qjax/data/tiny_english.txt"
    history = saved["history"]
    assert history["epoch"] == list(range(1, config.epochs + 1))
    assert history["train_loss"][-1] < history["train_loss"][0]
    # Trained: far below the perplexity of a uniform guess over the characters.
    vocab_size = saved["corpus"]["vocab_size"]
    assert results["float"]["valid_perplexity"] < vocab_size / 3
    assert results["float"]["test_perplexity"] < vocab_size / 3
    assert results["train_tokens_per_s"] > 0 and results["float"]["eval_tokens_per_s"] > 0
    assert saved["command"].startswith("python -m") and saved["machine"]["devices"]
    assert saved["config"]["model"]["d_model"] == config.model.d_model
    table = (tmp_path / "results.md").read_text()
    assert "| float |" in table and "Machine:" in table
    # The saved float model is the trained one.
    corpus = pipeline.load_corpus(config)
    model = pipeline.restore_float_model(config, str(tmp_path), vocab_size=len(corpus.vocab))
    valid = transformer.perplexity(
        model, corpus.valid, batch_size=config.eval_batch_size, seq_len=config.seq_len
    )
    assert valid == pytest.approx(results["float"]["valid_perplexity"], rel=1e-5)
    # A second run resumes from the last checkpoint: no training, the same results.
    again = pipeline.run(config, str(tmp_path))
    assert again["float"]["valid_perplexity"] == pytest.approx(valid, rel=1e-5)
    assert again["history"] == results["history"]


def test_train_batches_depend_on_seed_and_epoch_only():
    config = small_config()
    config.seq_len, config.batch_size = 8, 4
    tokens = np.arange(200, dtype=np.int32)
    batches = pipeline.train_batches(tokens, 0, config)
    assert len(batches) == pipeline.steps_per_epoch(config, 200) == 6
    for batch in batches:
        assert batch.shape == (4, 9) and batch.dtype == np.int32
        np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    starts = np.sort(np.concatenate([b[:, 0] for b in batches]))
    assert len(set(starts % 8)) == 1  # one offset per epoch; windows never overlap
    again = pipeline.train_batches(tokens, 0, config)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other_epochs = [pipeline.train_batches(tokens, epoch, config)[0] for epoch in range(1, 4)]
    assert not all(np.array_equal(batches[0], b) for b in other_epochs)
    with pytest.raises(ValueError, match="too few"):
        pipeline.steps_per_epoch(config, 30)


class Interrupted(Exception):
    pass


def test_resume_after_a_kill_gives_the_same_parameters(tmp_path):
    config = small_config(dropout_rate=0.1)
    corpus = pipeline.load_corpus(config)
    corpus = corpus._replace(train=corpus.train[:12_000], valid=corpus.valid[:1_000])
    full, full_history = pipeline.train(config, common.open_workdir(config, tmp_path / "a"), corpus)

    def kill_after_one(phase, epoch):
        if epoch == 1:
            raise Interrupted

    killed = common.open_workdir(config, tmp_path / "b", on_checkpoint=kill_after_one)
    with pytest.raises(Interrupted):
        pipeline.train(config, killed, corpus)
    resumed, history = pipeline.train(config, common.open_workdir(config, tmp_path / "b"), corpus)
    assert history["train_loss"] == full_history["train_loss"]
    leaves = lambda model: jax.tree.leaves(nnx.state(model, nnx.Param))
    for a, b in zip(leaves(full), leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(full_history["epoch"]) == 2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_follows_the_step_key(scan_layers):
    """The loss's dropout masks are a function of the key alone (so a resumed run redraws them)."""
    config = small_config(dropout_rate=0.5, scan_layers=scan_layers)
    model = pipeline.make_model(config, 11)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = jax.jit(pipeline.lm_loss(graphdef, rest))
    windows = np.arange(2 * 9, dtype=np.int32).reshape(2, 9) % 11
    loss = lambda seed: float(loss_fn(params, {}, windows, jax.random.key(seed))[0])
    assert loss(0) == loss(0) and loss(0) != loss(1)


def test_weight_decay_spares_biases_and_layer_norms():
    config = small_config()
    model = pipeline.make_model(config, 11)
    params = nnx.state(model, nnx.Param)
    tx = pipeline.make_optimizer(config, 100)
    state = tx.init(params)
    zero = jax.tree.map(np.zeros_like, params)
    for _ in range(2):  # the learning rate is 0 at step 0; with zero gradients only weight
        updates, state = jax.jit(tx.update)(zero, state, params)  # decay moves parameters
    moved = jax.tree.map(lambda u: bool(np.any(u != 0)), updates)
    names = [name.removesuffix("/value") for name in jax.tree.leaves(transforms.path_names(moved))]
    flags = dict(zip(names, jax.tree.leaves(moved), strict=True))
    assert flags["embed/embedding"] and flags["position/embedding"]
    assert flags["blocks/0/mlp_in/kernel"] and flags["blocks/0/attention/query/kernel"]
    assert not flags["blocks/0/mlp_in/bias"] and not flags["final_norm/scale"]


def test_calibration_batches_fit_the_model():
    config = tiny.get_config()
    corpus = pipeline.load_corpus(config)
    model = pipeline.make_model(config, len(corpus.vocab))
    batch = data.calibration_batches(corpus, num_sequences=4, seq_len=config.seq_len, seed=0)
    assert nnx.view(model, deterministic=True)(batch).shape == (4, config.seq_len, 65)


def test_ptb_config_builds_its_model():
    config = ptb.get_config()
    model = nnx.eval_shape(lambda: pipeline.make_model(config, 10_000))
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert math.isclose(count, ptb.NUM_PARAMS, rel_tol=1e-6)
    assert pipeline.steps_per_epoch(config, 929_589) > 0


def test_ptb_long_config_sweeps_every_scale_and_seed():
    config = ptb_long.get_config()
    assert ptq.granularities(config) == ("channel", "tensor", "group")
    assert ptq.calibration_seeds(config) == (0, 1, 2)
    assert all(m in qjax.methods.names() for m in config.ptq.methods)
    model = nnx.eval_shape(lambda: pipeline.make_model(config, 10_000))
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert math.isclose(count, ptb.NUM_PARAMS, rel_tol=1e-6)  # the same model, trained longer


def test_unknown_dataset():
    config = tiny.get_config()
    config.dataset = "wikitext"
    with pytest.raises(ValueError, match="'ptb' or 'chars'"):
        pipeline.load_corpus(config)


@pytest.mark.slow
def test_ptb_pipeline_on_real_data(tmp_path):
    """Two short epochs of the PTB config's model on the first 40,000 training words."""
    config = ptb.get_config()
    try:
        corpus = pipeline.load_corpus(config)
    except FileNotFoundError:
        pytest.skip("Penn Treebank is not available")
    corpus = corpus._replace(train=corpus.train[:40_000], valid=corpus.valid[:5_000])
    config.epochs, config.warmup_steps = 2, 5
    model, history = pipeline.train(config, common.open_workdir(config, tmp_path), corpus)
    assert history["train_loss"][1] < history["train_loss"][0] < math.log(10_000)
    assert history["valid_perplexity"][-1] < 2_000
    assert model.config.vocab_size == 10_000


def small_ptq_config():
    """A one-layer model quantized at 2 bits, C among MSE and 1.0: the sweep's every branch."""
    config = small_config()
    config.epochs = 1
    config.ptq.update(
        methods=("gpfq", "msq"), bits=(2,), c_values=(None, 1.0), calibration_sequences=8
    )
    return config


def test_quantization_sweep_end_to_end(tmp_path):
    config = small_ptq_config()
    results = ptq.run(config, str(tmp_path))  # trains the float model first: none saved
    out = tmp_path / ptq.OUTPUT_DIR
    saved = json.loads((out / "results.json").read_text())
    assert saved["best"] == json.loads(json.dumps(results["best"])) and saved["command"].startswith(
        "python -m"
    )
    for name in ("results.md", "perplexity_vs_bits.png", "layer_error.png"):
        assert (out / name).stat().st_size > 0
    assert len(results["sweep"]) == 2 * 1 * 2 * 2  # methods × bits × granularities × C
    assert len(results["best"]) == 2 * 1 * 2
    for best in results["best"]:
        same = [
            r
            for r in results["sweep"]
            if (r["method"], r["bits"], r["granularity"])
            == (best["method"], best["bits"], best["granularity"])
        ]
        assert best["valid_perplexity"] == min(r["valid_perplexity"] for r in same)
        assert math.isfinite(best["test_perplexity"])
        paths = [layer["path"] for layer in best["layers"]]
        assert paths == [
            f"blocks/0/{name}"
            for name in ("attention/query", "attention/key", "attention/value", "attention/out")
        ] + ["blocks/0/mlp_in", "blocks/0/mlp_out"]
        assert all(layer["num_letters"] == 4 for layer in best["layers"])
    # GPFQ's per-layer error is below rounding's (the error of MSQ with the same X~).
    for layer in results["layer_errors"]["gpfq"]:
        assert layer["relative_error"] < layer["msq_relative_error"]
    assert set(results["seconds"]) == {"gpfq", "msq"}
    table = (out / "results.md").read_text()
    assert "| GPFQ | group 32 |" in table and "Machine:" in table
    # The training workdir's fingerprint ignores the ptq settings: the float model is reused.
    config.ptq.bits = (3,)
    assert common.fingerprint(pipeline.float_config(config)) == common.fingerprint(
        pipeline.float_config(small_ptq_config())
    )
    model = ptq.float_model(config, str(tmp_path))
    assert math.isclose(
        ptq.perplexity(model, pipeline.load_corpus(config).valid, config),
        results["float"]["valid_perplexity"],
        rel_tol=1e-5,
    )


def test_calibration_seeds_each_choose_c_and_give_mean_and_std(tmp_path):
    """Each calibration seed draws its own windows and chooses its own C on validation; the
    table reports mean ± std (ddof = 1) of the seeds' test perplexities."""
    config = small_ptq_config()
    config.ptq.update(methods=("gpfq",), c_values=(None, 1.0))
    config.ptq.granularities = ("tensor",)
    config.ptq.calibration_seeds = (0, 1, 2)
    results = ptq.run(config, str(tmp_path))
    assert len(results["sweep"]) == 1 * 1 * 1 * 2 * 3  # methods × bits × scales × C × seeds
    assert [r["seed"] for r in results["best"]] == [0, 1, 2]
    for best in results["best"]:
        same = [r for r in results["sweep"] if r["seed"] == best["seed"]]
        assert best["valid_perplexity"] == min(r["valid_perplexity"] for r in same)
    [summary] = results["over_seeds"]
    values = [r["test_perplexity"] for r in results["best"]]
    assert summary["test_perplexity"] == values and len(set(values)) > 1
    assert math.isclose(summary["std"], float(np.std(values, ddof=1)))
    table = (tmp_path / ptq.OUTPUT_DIR / "results.md").read_text()
    assert f"| GPFQ | per tensor | {summary['mean']:.2f} ± {summary['std']:.2f} |" in table
    windows = [ptq.calibration(pipeline.load_corpus(config), config, seed) for seed in (0, 1)]
    assert not np.array_equal(windows[0][0], windows[1][0])


def test_a_single_c_skips_validation_and_a_stopped_sweep_keeps_its_finished_cells(
    tmp_path, monkeypatch
):
    """With one C there is nothing to choose (no validation pass); results.json is rewritten
    after every cell, so a sweep stopped in its second method keeps the first one's cells."""
    config = small_ptq_config()
    config.ptq.update(c_values=(1.0,), bits=(2, 3))
    config.ptq.granularities = ("tensor",)
    config.ptq.output_dir = "ptq_tensor"
    score = ptq.quantize_and_score

    def stop_at_msq(*args, method, **kwargs):
        if method == "msq":
            raise KeyboardInterrupt
        return score(*args, method=method, **kwargs)

    monkeypatch.setattr(ptq, "quantize_and_score", stop_at_msq)
    with pytest.raises(KeyboardInterrupt):
        ptq.run(config, str(tmp_path))
    out = tmp_path / "ptq_tensor"
    saved = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["bits"]) for r in saved["best"]] == [("gpfq", 2)]
    assert all(r["valid_perplexity"] is None for r in saved["sweep"])
    [cell] = saved["best"]
    table = (out / "results.md").read_text()
    assert "C = 1 " in table
    assert f"| float | {saved['float']['valid_perplexity']:.2f} " in table
    assert f"| GPFQ | per tensor | {cell['test_perplexity']:.2f} (1) | not run |" in table
    assert "| MSQ | per tensor | not run | not run |" in table


def test_layer_specs_and_head_rules():
    config = small_config()
    spec = ptq.layer_spec(config, method="gptq", bits=3, granularity="group", c=None)
    assert (spec.method, spec.bits, spec.group_size, spec.c) == ("gptq", 3, 32, None)
    assert (
        ptq.layer_spec(config, method="msq", bits=4, granularity="channel", c=1.0).group_size
        is None
    )
    tensor = ptq.layer_spec(config, method="msq", bits=4, granularity="tensor", c=None)
    assert tensor.group_size is None and not tensor.per_channel
    with pytest.raises(ValueError, match="granularity"):
        ptq.layer_spec(config, method="msq", bits=4, granularity="row", c=None)
    config.ptq.granularities = ("channel", "row")
    with pytest.raises(ValueError, match="row"):
        ptq.granularities(config)
    tied = pipeline.make_model(config, 11)
    assert ptq.layer_rules(tied, config) == []
    config.model.tied_head = False
    untied = pipeline.make_model(config, 11)
    [(pattern, head)] = ptq.layer_rules(untied, config)
    assert pattern == "head" and head.method == "msq" and head.bits == 8
    config.ptq.head_bits = 0
    assert ptq.layer_rules(untied, config)[0][1].skip


def test_unknown_quantization_method(tmp_path):
    config = small_ptq_config()
    config.ptq.methods = ("gpfq", "awq")
    with pytest.raises(ValueError, match="awq"):
        ptq.run(config, str(tmp_path))
