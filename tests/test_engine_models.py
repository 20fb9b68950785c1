"""qjax.quantize_model on models as other authors write them, Linen and NNX: several arguments
per call (tokens, positions, a mask), a `call=` hook, list and config attributes, boxed
(logically partitioned) parameters, a bare layer as the model, and bad inputs (NaN, token ids
outside the vocabulary, a dataset's (x, y) pairs, a model left in training mode) named as
errors before anything is quantized."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import LayerSpec, alphabets
from qjax.rules import path_name

VOCAB, SEQ, D, WIDTHS = 13, 5, 6, [7, 4]
SPEC = LayerSpec(method="gpfq", bits=2, c=1.0, rule="max", per_channel=True)


def _tokens(seed, batch=6):
    keys = jax.random.split(jax.random.key(seed), 2)
    tokens = jax.random.randint(keys[0], (batch, SEQ), 0, VOCAB)
    positions = jnp.broadcast_to(jnp.arange(SEQ), (batch, SEQ))
    mask = jax.random.bernoulli(keys[1], 0.7, (batch, SEQ))
    return tokens, positions, mask


def _embedded(embed, pos, tokens, positions, mask):
    """The first Dense's input: token plus position embedding, zero where masked."""
    x = np.asarray(embed)[np.asarray(tokens)] + np.asarray(pos)[np.asarray(positions)]
    return jnp.asarray(x * np.asarray(mask)[..., None], jnp.float32)


_partitioned = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))


class LinenDecoder(nn.Module):
    """Gemma/BERT-shaped call: tokens, positions, a cache and a mask; a list attribute; boxed
    kernels (MaxText / lm1b style)."""

    vocab: int
    widths: list

    @nn.compact
    def __call__(self, tokens, positions, cache=None, attention_mask=None):
        assert cache is None
        x = nn.Embed(self.vocab, D, name="embed")(tokens)
        x = x + nn.Embed(SEQ, D, name="pos")(positions)
        if attention_mask is not None:
            x = x * attention_mask[..., None]
        for i, width in enumerate(self.widths):
            x = nn.gelu(nn.Dense(width, kernel_init=_partitioned, name=f"fc{i}")(x))
        return nn.Dense(self.vocab, name="head")(x)


class Config:
    """A config object, as `transformers` models hold (unhashable: it has a list)."""

    def __init__(self, vocab, widths):
        self.vocab, self.widths = vocab, list(widths)


class NNXDecoder(nnx.Module):
    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.config = config
        self.options = {"widths": list(config.widths)}  # an unhashable attribute
        self.embed = nnx.Embed(config.vocab, D, rngs=rngs)
        self.pos = nnx.Embed(SEQ, D, rngs=rngs)
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        sizes = [D, *config.widths]
        self.fcs = nnx.List(
            [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.head = nnx.Linear(sizes[-1], config.vocab, rngs=rngs)

    def __call__(self, tokens, positions, cache=None, attention_mask=None):
        assert cache is None
        x = self.embed(tokens) + self.pos(positions)
        if attention_mask is not None:
            x = x * attention_mask[..., None]
        for fc in self.fcs:
            x = nnx.gelu(fc(x))
        return self.head(x)


@pytest.fixture(scope="module")
def linen():
    model = LinenDecoder(VOCAB, list(WIDTHS))
    tokens, positions, mask = _tokens(0)
    variables = model.init(jax.random.key(1), tokens, positions, attention_mask=mask)
    return model, variables


@pytest.fixture(scope="module")
def nnx_model():
    with nnx.use_eager_sharding(False):
        return NNXDecoder(Config(VOCAB, WIDTHS), nnx.Rngs(0))


def _first_layer_codes(w, embed, pos, batches):
    """fc0's codes by hand: GPFQ from X = X~ = the masked embeddings of all batches."""
    x = jnp.concatenate([_embedded(embed, pos, *b).reshape(-1, D) for b in batches])
    alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
    return qjax.gpfq_layer(w, x, x, alphabet)


def _dict_batches():
    return [
        {"tokens": t, "positions": p, "attention_mask": m}
        for t, p, m in (_tokens(2), _tokens(3, batch=4))
    ]


def test_linen_keyword_batches_with_a_mask_and_boxed_kernels(linen):
    """Per-batch keyword arrays reach the model (the mask changes fc0's X: codes by hand), both
    schedules agree, and the boxed kernels come back boxed with their sharding names."""
    model, variables = linen
    batches = _dict_batches()
    unboxed = nn.meta.unbox(variables)["params"]
    expected = _first_layer_codes(
        unboxed["fc0"]["kernel"],
        unboxed["embed"]["embedding"],
        unboxed["pos"]["embedding"],
        [(b["tokens"], b["positions"], b["attention_mask"]) for b in batches],
    )
    results = {}
    for one_pass in (True, False):
        quantized, reports = qjax.quantize_model(
            model, variables, batches, spec=SPEC, one_pass=one_pass, progress=False
        )
        box = quantized["params"]["fc0"]["kernel"]
        assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("embed", "mlp")
        np.testing.assert_allclose(box.value, expected, atol=1e-6)
        assert [r.path for r in reports] == ["fc0", "fc1", "head"]
        results[one_pass] = nn.meta.unbox(quantized)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[True], results[False]
    )
    # The boxes' structure is the input's: the model still initialises and applies the same way.
    assert jax.tree.structure(quantized, is_leaf=lambda x: isinstance(x, nn.Partitioned)) == (
        jax.tree.structure(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )


def test_linen_tuple_pair_and_call_hook_batches_agree(linen):
    """The same batches as positional tuples with a keyword dict, and through `call=`, give the
    same codes as keyword batches."""
    model, variables = linen
    batches = _dict_batches()
    by_keywords, _ = qjax.quantize_model(model, variables, batches, spec=SPEC, progress=False)
    pairs = [
        ((b["tokens"], b["positions"]), {"attention_mask": b["attention_mask"]}) for b in batches
    ]
    by_pairs, _ = qjax.quantize_model(model, variables, pairs, spec=SPEC, progress=False)

    def call(bound, batch):
        return bound(batch["tokens"], batch["positions"], None, batch["attention_mask"])

    hooked, _ = qjax.quantize_model(model, variables, batches, spec=SPEC, call=call, progress=False)
    for other in (by_pairs, hooked):
        jax.tree.map(
            np.testing.assert_array_equal, nn.meta.unbox(other), nn.meta.unbox(by_keywords)
        )


def test_nnx_keyword_batches_config_attributes_and_sharding_metadata(nnx_model):
    module = nnx_model
    batches = _dict_batches()
    expected = _first_layer_codes(
        module.fcs[0].kernel.get_value(),
        module.embed.embedding.get_value(),
        module.pos.embedding.get_value(),
        [(b["tokens"], b["positions"], b["attention_mask"]) for b in batches],
    )
    got = {}
    for one_pass in (True, False):
        quantized, reports = qjax.quantize_model(
            module, batches, spec=SPEC, one_pass=one_pass, progress=False
        )
        kernel = quantized.fcs[0].kernel
        np.testing.assert_allclose(kernel.get_value(), expected, atol=1e-6)
        assert kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
        assert [r.path for r in reports] == ["fcs/0", "fcs/1", "head"]
        got[one_pass] = {
            path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(quantized))
        }
    for name, value in got[True].items():
        np.testing.assert_allclose(value, got[False][name], atol=1e-6, err_msg=name)
    # Positional tuples and a call hook reach the same model.
    tuples = [(b["tokens"], b["positions"], None, b["attention_mask"]) for b in batches]
    by_tuples, _ = qjax.quantize_model(module, tuples, spec=SPEC, progress=False)
    np.testing.assert_allclose(by_tuples.fcs[0].kernel.get_value(), expected, atol=1e-6)


def test_unhashable_attributes_reuse_the_compiled_pass(linen, nnx_model):
    """A module with list/config attributes is never hashed: the program is reused while the
    same object is quantized again."""
    from qjax.adapters import linen as linen_adapter
    from qjax.adapters import nnx as nnx_adapter

    model, variables = linen
    batch = _dict_batches()[0]
    for passes, args in (
        (linen_adapter._paired_pass, (model, variables, batch)),
        (nnx_adapter._paired_pass, (nnx_model, batch)),
    ):
        qjax.quantize_model(*args, spec=SPEC, progress=False)
        before = passes.cache_info()
        qjax.quantize_model(*args, spec=SPEC, progress=False)
        assert passes.cache_info().hits == before.hits + 1
        assert passes.cache_info().misses == before.misses


def test_dataset_pairs_are_never_fed_as_inputs():
    """(x, y) batches: an error saying how to pass the inputs only, whatever the model."""

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(3)(x)

    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    model = Classifier()
    variables = model.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"argument 'train'.*inputs only"):
        qjax.quantize_model(model, variables, [(x, y)], progress=False)
    linear = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs only"):  # y would be the layer's out_sharding
        qjax.quantize_model(linear, [(x, y)], progress=False)

    class OneInput(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(5, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match=r"do not fit.*inputs only"):
        qjax.quantize_model(OneInput(), [(x, y)], progress=False)
    # The inputs alone, or a call taking them out of the pair, work.
    qjax.quantize_model(OneInput(), [x], progress=False)
    qjax.quantize_model(OneInput(), [(x, y)], call=lambda m, b: m(b[0]), progress=False)


def test_array_apply_kwargs_are_shared_by_every_batch():
    class Scaled(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

        def __call__(self, x, scale):
            return self.fc(x * scale)

    x = jax.random.normal(jax.random.key(0), (10, 4))
    scale = jnp.array([1.0, 2.0, 0.5, 3.0])
    module = Scaled()
    got, _ = qjax.quantize_model(
        module, [x[:6], x[6:]], spec=SPEC, apply_kwargs={"scale": scale}, progress=False
    )
    w = module.fc.kernel.get_value()
    alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
    expected = qjax.gpfq_layer(w, x * scale, x * scale, alphabet)
    np.testing.assert_allclose(got.fc.kernel.get_value(), expected, atol=1e-6)


def test_bare_layers_as_the_model():
    x = jax.random.normal(jax.random.key(0), (12, 5))
    linear = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    dense = nn.Dense(4)
    variables = dense.init(jax.random.key(1), x)
    for w, run in (
        (linear.kernel.get_value(), lambda: qjax.quantize_model(linear, x, spec=SPEC)),
        (
            variables["params"]["kernel"],
            lambda: qjax.quantize_model(dense, variables, x, spec=SPEC),
        ),
    ):
        quantized, reports = run()
        kernel = (
            quantized.kernel.get_value()
            if isinstance(quantized, nnx.Module)
            else quantized["params"]["kernel"]
        )
        alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
        np.testing.assert_allclose(kernel, qjax.gpfq_layer(w, x, x, alphabet), atol=1e-6)
        assert [(r.path, r.kind) for r in reports] == [("", "Dense")]


def test_batchnorm_model_in_training_mode_names_the_argument():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))
            return nn.Dense(2)(x)

    class Unset(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(2)(nn.BatchNorm()(nn.Dense(6)(x), use_running_average=not train))

    x = jax.random.normal(jax.random.key(0), (8, 3))
    for model in (Net(), Unset()):
        variables = model.init(jax.random.key(1), x, train=False)
        with pytest.raises(ValueError, match=r"training mode.*apply_kwargs=\{'train': False\}"):
            qjax.quantize_model(model, variables, x, progress=False)
        qjax.quantize_model(model, variables, x, apply_kwargs={"train": False}, progress=False)


def test_non_finite_weights_inputs_and_token_ids_are_named(linen, nnx_model):
    model, variables = linen
    batches = _dict_batches()
    bad = jax.tree.map(lambda v: v, nn.meta.unbox(variables))
    bad["params"]["fc1"]["kernel"] = bad["params"]["fc1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="weight params/fc1/kernel contains NaN"):
        qjax.quantize_model(model, bad, batches, progress=False)
    big = dict(batches[1], tokens=batches[1]["tokens"].at[0, 0].set(VOCAB))
    with pytest.raises(ValueError, match=r"batch 1: embedding embed .* ids from 0 to 13.* 13 rows"):
        qjax.quantize_model(model, variables, [batches[0], big], progress=False)
    with pytest.raises(ValueError, match=r"batch 1: embedding embed .* outside"):
        qjax.quantize_model(nnx_model, [batches[0], big], progress=False)
    nan_batch = dict(batches[0], attention_mask=batches[0]["attention_mask"] * jnp.nan)
    with pytest.raises(ValueError, match=r"keyword argument 'attention_mask' contains NaN"):
        qjax.quantize_model(nnx_model, [nan_batch], progress=False)

    class Overflow(nnx.Module):
        def __init__(self):
            self.fc0 = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.fc1 = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.fc1(self.fc0(x) / x[:, :1])  # Inf where x's first feature is 0

    x = jax.random.normal(jax.random.key(0), (8, 3))
    with pytest.raises(ValueError, match=r"batch 1: the input of layer fc1 holds NaN or Inf"):
        qjax.quantize_model(Overflow(), [x[:4], x[4:].at[1, 0].set(0.0)], progress=False)


def test_report_alphabets_and_export_with_defaults(linen, nnx_model):
    """Each report row carries the alphabet its layer was quantized to; `export_params` with its
    defaults packs the kernels and leaves the float embeddings out."""
    model, variables = linen
    batches = _dict_batches()
    quantized, reports = qjax.quantize_model(model, variables, batches, spec=SPEC, progress=False)
    params = nn.meta.unbox(variables)["params"]
    for report in reports:
        expected = alphabets.for_weights(
            params[report.path]["kernel"], c=1.0, bits=2, rule="max", per_channel=True
        )
        assert report.num_letters == report.alphabet.size == 4
        jax.tree.map(np.testing.assert_array_equal, report.alphabet, expected)
    nnx_quantized = qjax.quantize_model(nnx_model, batches, spec=SPEC, progress=False)[0]
    for tree, kernels in (
        (quantized, {"params/fc0/kernel", "params/fc1/kernel", "params/head/kernel"}),
        (nnx.state(nnx_quantized), {"fcs/0/kernel", "fcs/1/kernel", "head/kernel"}),
    ):
        packed = qjax.export.export_params(tree)
        is_packed = lambda leaf: isinstance(leaf, qjax.export.QuantizedArray)
        leaves = jax.tree_util.tree_leaves_with_path(packed, is_leaf=is_packed)
        assert {path_name(p) for p, leaf in leaves if is_packed(leaf)} == kernels
        for p, leaf in leaves:  # the embeddings, like every other leaf, as they were
            if path_name(p).endswith("embedding"):
                assert isinstance(leaf, jax.Array)


class FlaxConv1D(nn.Module):
    """A copy of `transformers`' GPT-2 Conv1D: a Dense whose kernel is stored transposed."""

    features: int

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param(
            "kernel", nn.initializers.normal(0.5), (self.features, inputs.shape[-1])
        )
        return jax.lax.dot_general(inputs, kernel.T, (((inputs.ndim - 1,), (0,)), ((), ())))


class Mine(nn.Module):
    """A custom layer multiplying its own parameter, not named kernel."""

    @nn.compact
    def __call__(self, x):
        return jnp.dot(x, self.param("w", nn.initializers.normal(0.5), (x.shape[-1], 3)))


class LinenGPT2ish(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(FlaxConv1D(6, name="c_fc")(x))
        return Mine(name="mine")(FlaxConv1D(4, name="c_proj")(x))


class NNXConv1D(nnx.Module):
    def __init__(self, n_in, n_out, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (n_out, n_in)) * 0.5)

    def __call__(self, x):
        return x @ self.w.T


class NNXGPT2ish(nnx.Module):
    def __init__(self, rngs):
        self.c_fc = NNXConv1D(5, 6, rngs)
        self.c_proj = NNXConv1D(6, 4, rngs)
        self.mine = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x):
        return jnp.dot(self.c_proj(nnx.gelu(self.c_fc(x))), self.mine)


def _transposed_codes(w_t, x):
    """GPFQ codes of a transposed kernel by hand: quantize W = kernelᵀ, store Qᵀ."""
    w = w_t.T
    alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
    return qjax.gpfq_layer(w, x, x, alphabet).T


def test_registered_transposed_kernels_and_unreached_parameters(monkeypatch):
    """Conv1D-style layers are refused (Linen) or not reached (NNX: no kernel) until registered
    as transposed Dense layers; then their first layer gets the hand-computed codes. A custom
    layer's own parameter in a product is listed as "not reached", never silently missing."""
    monkeypatch.setattr(qjax.layers, "_REGISTERED", {})
    x = jax.random.normal(jax.random.key(0), (16, 5))
    model = LinenGPT2ish()
    variables = model.init(jax.random.key(1), x)
    module = NNXGPT2ish(nnx.Rngs(2))
    with pytest.raises(ValueError, match="layer c_fc is a FlaxConv1D"):
        qjax.quantize_model(model, variables, x, progress=False)
    _, reports = qjax.quantize_model(
        model, variables, x, rules=[("c_.*", LayerSpec(method="skip"))], progress=False
    )
    assert [(r.path, r.method) for r in reports] == [
        ("c_fc", "skip"),
        ("c_proj", "skip"),
        ("params/mine/w", "not reached"),
    ]
    with pytest.raises(ValueError, match="has no layer with a kernel"):
        qjax.quantize_model(module, x, progress=False)

    qjax.register_layer(FlaxConv1D, qjax.layers.Dense(transposed=True))
    qjax.register_layer(NNXConv1D, qjax.layers.Dense(transposed=True), param="w")
    for one_pass in (True, False):
        quantized, reports = qjax.quantize_model(
            model, variables, x, spec=SPEC, one_pass=one_pass, progress=False
        )
        kernel = variables["params"]["c_fc"]["kernel"]
        np.testing.assert_allclose(
            quantized["params"]["c_fc"]["kernel"], _transposed_codes(kernel, x), atol=1e-6
        )
        assert [(r.path, r.kind, r.method, r.shape) for r in reports] == [
            ("c_fc", "Dense", "gpfq", (6, 5)),
            ("c_proj", "Dense", "gpfq", (4, 6)),
            ("params/mine/w", "?", "not reached", (4, 3)),
        ]
        new, reports = qjax.quantize_model(module, x, spec=SPEC, one_pass=one_pass, progress=False)
        np.testing.assert_allclose(
            new.c_fc.w.get_value(), _transposed_codes(module.c_fc.w.get_value(), x), atol=1e-6
        )
        assert [(r.path, r.method) for r in reports] == [
            ("c_fc", "gpfq"),
            ("c_proj", "gpfq"),
            ("mine", "not reached"),
        ]
    # The second layer saw X~ from the quantized first one: 4 letters per output channel.
    assert max(len(np.unique(row)) for row in np.asarray(new.c_proj.w.get_value())) <= 4


class _TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.fc0 = nnx.Linear(9, 8, rngs=rngs)
        self.fc1 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc1(nnx.relu(self.fc0(x)))


@pytest.mark.parametrize("one_pass", [True, False])
def test_nan_codes_from_finite_statistics_name_the_layer(monkeypatch, one_pass):
    """A method whose arithmetic fails on finite statistics (GPTQ's factorization failing at
    every damping, made to happen here on fc1) is an error naming the layer in both schedules,
    never a model with NaN weights."""
    original = qjax.GPTQ.quantize_matrix

    def failing_on_fc1(self, w, stats, alphabet):
        q = original(self, w, stats, alphabet)
        return jnp.full_like(q, jnp.nan) if w.shape[-1] == 3 else q

    monkeypatch.setattr(qjax.GPTQ, "quantize_matrix", failing_on_fc1)
    x = jax.random.normal(jax.random.key(0), (32, 9))
    with pytest.raises(ValueError, match=r"layer fc1: gptq.*NaN.*could not be factored"):
        qjax.quantize_model(
            _TwoLayers(nnx.Rngs(0)),
            x,
            spec=LayerSpec(method="gptq", bits=3),
            one_pass=one_pass,
            progress=False,
        )
