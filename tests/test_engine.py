"""Tests of qjax.quantize_model across frameworks and layer kinds.

The centrepiece: the same small transformer language model (token embedding, causal multi-head
attention with DenseGeneral/LinearGeneral q/k/v/out projections, a GELU MLP, a scanned stack of
blocks, an Einsum head) written in Flax Linen and in Flax NNX, with the same weights, gets the
same codes, and each slice of the scanned stack is quantized with its own X and X~.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import LayerSpec
from qjax.rules import path_name

VOCAB, D, HEADS, LAYERS, SEQ = 11, 8, 2, 3, 6


def _attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln1")(x)
        qkv = [nn.DenseGeneral((HEADS, D // HEADS), name=n)(h) for n in ("query", "key", "value")]
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(_attention(*qkv))
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(2 * D, name="fc1")(h))), None


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        blocks = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        x, _ = blocks(name="blocks")(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Einsum((D, VOCAB), "bsd,dv->bsv", use_bias=False, name="head")(x)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.query, self.key, self.value = (
            nnx.LinearGeneral(D, (HEADS, D // HEADS), rngs=rngs) for _ in range(3)
        )
        self.out = nnx.LinearGeneral((HEADS, D // HEADS), D, axis=(-2, -1), rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.out(_attention(self.query(h), self.key(h), self.value(h)))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NNXLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return NNXBlock(rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Einsum("bsd,dv->bsv", (D, VOCAB), rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.head(self.ln_f(run(self.embed(tokens), self.blocks)))


def _by_name(tree):
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _linen_and_nnx_lm():
    """The two models with the same weights, and token calibration batches."""
    tokens = jax.random.randint(jax.random.key(0), (16, SEQ), 0, VOCAB)
    model = LinenLM()
    variables = model.init(jax.random.key(1), tokens)
    # Make the weights larger than init so that quantization matters, then copy them to NNX.
    variables = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, variables)
    module = NNXLM(nnx.Rngs(2))
    linen = {name.removeprefix("params/"): v for name, v in _by_name(variables).items()}
    graphdef, state = nnx.split(module)
    names = _by_name(state)
    assert sorted(names) == sorted(linen), (sorted(names), sorted(linen))
    state = jax.tree_util.tree_map_with_path(lambda p, _: linen[path_name(p)], state)
    module = nnx.merge(graphdef, state)
    np.testing.assert_allclose(model.apply(variables, tokens), module(tokens), rtol=1e-5, atol=1e-5)
    return model, variables, module, [tokens[:8], tokens[8:]]


@pytest.fixture(scope="module")
def lm():
    return _linen_and_nnx_lm()


@pytest.mark.parametrize("method", ["gpfq", "gptq", "msq"])
def test_linen_and_nnx_transformers_get_the_same_codes(lm, method):
    model, variables, module, calibration = lm
    spec = LayerSpec(method=method, bits=3)
    quantized, linen_reports = qjax.quantize_model(
        model, variables, calibration, spec=spec, progress=False
    )
    new_module, nnx_reports = qjax.quantize_model(module, calibration, spec=spec, progress=False)
    linen = {k.removeprefix("params/"): v for k, v in _by_name(quantized).items()}
    nnx_params = _by_name(nnx.state(new_module))
    for name, value in nnx_params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(linen[name]), err_msg=name)
    assert [r.path for r in linen_reports] == [r.path for r in nnx_reports]
    # Every attention and MLP kernel of every slice, and the head; the embedding stays float.
    expected = [
        f"blocks/{n}[{i}]"
        for n in ("query", "key", "value", "out", "fc1", "fc2")
        for i in range(LAYERS)
    ]
    assert sorted(r.path for r in nnx_reports) == sorted([*expected, "head"])
    np.testing.assert_array_equal(
        linen["embed/embedding"], variables["params"]["embed"]["embedding"]
    )
    for name, kernel in nnx_params.items():  # 3 bits: at most 8 letters per output channel
        if not name.endswith("kernel"):
            continue
        slices = np.asarray(kernel) if name.startswith("blocks/") else np.asarray(kernel)[None]
        in_axes = 2 if name == "blocks/out/kernel" else 1
        for kernel_slice in slices:
            matrix = kernel_slice.reshape(np.prod(kernel_slice.shape[:in_axes]), -1)
            assert max(len(np.unique(column)) for column in matrix.T) <= 8, name


def test_stacked_slices_are_quantized_in_order_with_their_own_inputs(lm):
    """Slice l of the scanned stack sees X~ from the network whose slices < l are quantized:
    quantizing the stack equals quantizing an unrolled copy of it, slice after slice."""
    _, _, module, calibration = lm
    spec = LayerSpec(method="gpfq", bits=2)
    stacked, reports = qjax.quantize_model(module, calibration, spec=spec, progress=False)
    # The third slice's first layer sees inputs that differ from the float network's: its GPFQ
    # error differs from its MSQ error, and each slice reports its own errors.
    errors = {r.path: r.relative_error for r in reports}
    assert len({errors[f"blocks/query[{i}]"] for i in range(LAYERS)}) == LAYERS
    # Unroll: a model whose blocks are applied in a Python loop gets the same codes.
    unrolled = _Unrolled(module)
    quantized_unrolled, _unrolled_reports = qjax.quantize_model(
        unrolled, calibration, spec=spec, progress=False
    )
    for i in range(LAYERS):
        for name in ("query", "key", "value", "out", "fc1", "fc2"):
            expected = getattr(quantized_unrolled.layers[i], name).kernel.get_value()
            got = getattr(stacked.blocks, name).kernel.get_value()[i]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=name)


class _Unrolled(nnx.Module):
    """NNXLM with its stacked blocks split into a list applied in a Python loop."""

    def __init__(self, stacked: NNXLM):
        self.embed, self.ln_f, self.head = stacked.embed, stacked.ln_f, stacked.head
        graphdef, state = nnx.split(stacked.blocks)
        self.layers = nnx.List(
            [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(LAYERS)]
        )

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x))


def test_nnx_module_is_left_untouched(lm):
    _, _, module, calibration = lm
    before = jax.tree.map(np.asarray, nnx.state(module))
    qjax.quantize_model(module, calibration, progress=False)
    after = jax.tree.map(np.asarray, nnx.state(module))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_rules_first_match_wins_and_skip(lm):
    _, _, module, calibration = lm
    rules = [
        ("blocks/(query|key|value)", LayerSpec(method="gptq", bits=4)),
        ("blocks/.*", LayerSpec(method="msq", bits=4)),
        ("head", LayerSpec(method="skip")),
    ]
    new, reports = qjax.quantize_model(module, calibration, rules=rules, progress=False)
    methods = {r.path.split("[")[0]: r.method for r in reports}
    assert methods["blocks/query"] == methods["blocks/value"] == "gptq"
    assert methods["blocks/out"] == methods["blocks/fc1"] == "msq"
    assert methods["head"] == "skip"
    np.testing.assert_array_equal(new.head.kernel.get_value(), module.head.kernel.get_value())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rules": [("blocks/attn", LayerSpec())]}, "match no layer"),
        ({"rules": [("block(", LayerSpec())]}, "invalid path pattern"),
        ({"rules": [("head", "gpfq")]}, "must map to a LayerSpec"),
    ],
)
def test_bad_rules_raise(lm, kwargs, message):
    _, _, module, calibration = lm
    with pytest.raises(ValueError, match=message):
        qjax.quantize_model(module, calibration, progress=False, **kwargs)


def test_unknown_method_name_raises_at_once():
    with pytest.raises(ValueError, match="unknown quantization method 'nope'; known"):
        LayerSpec(method="nope")


def test_bad_calibration_raises(lm):
    model, _variables, module, calibration = lm
    with pytest.raises(ValueError, match="floating point inputs or integer token ids"):
        qjax.quantize_model(module, [calibration[0].astype(bool)], progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        qjax.quantize_model(module, iter(calibration), progress=False)
    with pytest.raises(ValueError, match="positional arguments"):
        qjax.quantize_model(model, calibration, progress=False)


# ------------------------------------------------------------------------------------------
# One paired pass against layer by layer.
# ------------------------------------------------------------------------------------------


def _codes(result):
    tree = nnx.state(result) if isinstance(result, nnx.Module) else result
    return {k.removeprefix("params/"): np.asarray(v) for k, v in _by_name(tree).items()}


@pytest.mark.parametrize("method", ["gpfq", "gptq", "qronos"])
def test_one_pass_equals_layer_by_layer(lm, method):
    """Both schedules quantize each layer (each slice of the scanned stack) from the same X and
    X~: the same codes and errors, in Linen and NNX."""
    model, variables, module, calibration = lm
    spec = LayerSpec(method=method, bits=3, group_size=4)
    for args in ((model, variables, calibration), (module, calibration)):
        one, one_reports = qjax.quantize_model(*args, spec=spec, one_pass=True, progress=False)
        by_layer, reports = qjax.quantize_model(*args, spec=spec, one_pass=False, progress=False)
        expected = _codes(by_layer)
        for name, value in _codes(one).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
        assert [r.path for r in one_reports] == [r.path for r in reports]
        for got, want in zip(one_reports, reports, strict=True):
            assert got.num_letters == want.num_letters == 8
            np.testing.assert_allclose(got.relative_error, want.relative_error, rtol=1e-4)
            np.testing.assert_allclose(got.msq_relative_error, want.msq_relative_error, rtol=1e-4)


def test_second_call_reuses_the_compiled_pass(lm):
    """A second quantization with equal specs runs the compiled pass again, without tracing or
    compiling the model anew (the cost of a first call is mostly compilation)."""
    from qjax.adapters import linen as linen_adapter
    from qjax.adapters import nnx as nnx_adapter

    model, variables, module, calibration = lm
    spec = LayerSpec(method="gptq", bits=4)
    for pass_fn, args in (
        (nnx_adapter._paired_pass, (module, calibration)),
        (linen_adapter._paired_pass, (model, variables, calibration)),
    ):
        qjax.quantize_model(*args, spec=spec, progress=False)
        first = pass_fn.cache_info()
        qjax.quantize_model(*args, spec=LayerSpec(method="gptq", bits=4), progress=False)
        assert pass_fn.cache_info()[:2] == (first.hits + 1, first.misses)


def test_convolution_rows_are_summed_in_chunks(monkeypatch):
    """In one pass, a convolution's patches are formed a few examples at a time (bounded
    memory); the codes are those of the layer-by-layer schedule."""
    from qjax import engine

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (3, 3))(x))
            x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    images = jax.random.normal(jax.random.key(0), (12, 8, 8, 3))
    model = Net()
    variables = model.init(jax.random.key(1), images)
    monkeypatch.setattr(engine, "_MAX_PATCH_ROWS", 3 * 64)  # 3 images of 8×8 patches a chunk
    for spec in (
        LayerSpec(method="gpfq", bits=2),
        LayerSpec(method="gpfq", conv_neurons="channel"),
    ):
        one, _ = qjax.quantize_model(model, variables, images, spec=spec, progress=False)
        by_layer, _ = qjax.quantize_model(
            model, variables, [images[:5], images[5:]], spec=spec, one_pass=False, progress=False
        )
        for name, value in _codes(one).items():
            np.testing.assert_allclose(value, _codes(by_layer)[name], atol=1e-6, err_msg=name)


def test_not_sequential_quantizes_every_layer_from_float_inputs(lm):
    """sequential=False: X~ = X for every layer (one float pass). The layers before which
    nothing is quantized get the sequential codes; the later ones differ; both schedules agree."""
    model, variables, module, calibration = lm
    spec = LayerSpec(method="gpfq", bits=3)
    for args in ((model, variables, calibration), (module, calibration)):
        one, reports = qjax.quantize_model(*args, spec=spec, sequential=False, progress=False)
        by_layer, _ = qjax.quantize_model(
            *args, spec=spec, sequential=False, one_pass=False, progress=False
        )
        sequential, seq_reports = qjax.quantize_model(*args, spec=spec, progress=False)
        one, by_layer, sequential = _codes(one), _codes(by_layer), _codes(sequential)
        for name, value in one.items():
            np.testing.assert_array_equal(value, by_layer[name], err_msg=name)
        for name in ("query", "key", "value"):  # slice 0 sees only the float embedding
            kernel = f"blocks/{name}/kernel"
            np.testing.assert_array_equal(one[kernel][0], sequential[kernel][0])
        assert np.any(one["blocks/fc2/kernel"][2] != sequential["blocks/fc2/kernel"][2])
        assert reports[0].relative_error == pytest.approx(seq_reports[0].relative_error)


def test_apply_kwargs_with_lists_and_mutable_collections():
    """Forward-pass keyword arguments key the compiled programs: lists are accepted, a caller's
    `mutable` joins the pass's own."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
            return nn.Dense(4)(nn.relu(x))

    model = Net()
    x = jax.random.normal(jax.random.key(0), (32, 8))
    variables = model.init(jax.random.key(1), x)
    expected, _ = qjax.quantize_model(model, variables, x, apply_kwargs={"train": False})
    for one_pass in (True, False):
        got, _ = qjax.quantize_model(
            model,
            variables,
            x,
            apply_kwargs={"train": False, "mutable": ["batch_stats"]},
            one_pass=one_pass,
            progress=False,
        )
        for name, value in _codes(got).items():
            np.testing.assert_array_equal(value, _codes(expected)[name], err_msg=name)
