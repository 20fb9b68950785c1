"""The block-wise schedule of `qjax.quantize_model`: the same codes as layer by layer (and as the
NumPy reference), on NNX and Linen decoders built of a list of blocks called with a mask and
positions, with the block inputs cached on the device or on the host; its choice by
`schedule="auto"`, one compiled pass per block structure, and its errors."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import LayerSpec, engine
from qjax.adapters import nnx as nnx_adapter
from qjax.models.llama import Llama, LlamaConfig
from tests.test_engine_reference import (
    DenseLayer,
    _randomized,
    assert_engine_equals_reference,
    scaled,
)

VOCAB, SEQ, D, HIDDEN, BLOCKS = 11, 5, 8, 12, 2
SPEC = LayerSpec(method="gpfq", bits=3)


class NNXBlock(nnx.Module):
    """Pre-norm residual block: a masked projection, then an MLP; also given the positions."""

    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.pos = nnx.Embed(SEQ, D, rngs=rngs)  # an embedding inside a block stays float
        self.attn = nnx.Linear(D, D, rngs=rngs)
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x, positions, mask):
        h = self.norm(x) + self.pos(positions)
        x = x + self.attn(h) * mask[..., None]
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NNXDecoder(nnx.Module):
    def __init__(self, rngs, blocks=BLOCKS):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)  # a layer before the blocks
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(blocks)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)  # and one after them

    def __call__(self, tokens, positions, attention_mask):
        x = self.proj(self.embed(tokens))
        for block in self.blocks:
            x = block(x, positions, mask=attention_mask)
        return self.head(x)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, positions, mask):
        h = nn.LayerNorm()(x) + nn.Embed(SEQ, D, name="pos")(positions)
        x = x + nn.Dense(D, name="attn")(h) * mask[..., None]
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(HIDDEN, name="up")(x)))


class LinenDecoder(nn.Module):
    """Blocks created inline (Block_0, Block_1, ...)."""

    @nn.compact
    def __call__(self, tokens, positions, attention_mask):
        x = nn.Dense(D, name="proj")(nn.Embed(VOCAB, D)(tokens))
        for _ in range(BLOCKS):
            x = LinenBlock()(x, positions, mask=attention_mask)
        return nn.Dense(VOCAB, name="head")(x)


class LinenListDecoder(nn.Module):
    """Blocks in a list attribute of `setup` (layers_0, layers_1, ...)."""

    def setup(self):
        self.embed = nn.Embed(VOCAB, D)
        self.layers = [LinenBlock() for _ in range(BLOCKS)]
        self.head = nn.Dense(VOCAB)

    def __call__(self, tokens, positions, attention_mask):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions, mask=attention_mask)
        return self.head(x)


def _batches():
    out = []
    for seed, size in ((0, 4), (1, 3)):
        keys = jax.random.split(jax.random.key(seed), 2)
        out.append(
            {
                "tokens": jax.random.randint(keys[0], (size, SEQ), 0, VOCAB),
                "positions": jnp.broadcast_to(jnp.arange(SEQ), (size, SEQ)),
                "attention_mask": jax.random.bernoulli(keys[1], 0.7, (size, SEQ)).astype(
                    jnp.float32
                ),
            }
        )
    return out


def _leaves(result):
    tree = nnx.state(result) if isinstance(result, nnx.Module) else result
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(tree)}


def _assert_same(result, reports, expected, expected_reports):
    want = _leaves(expected)
    got = _leaves(result)
    assert got.keys() == want.keys()
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    assert [r.path for r in reports] == [r.path for r in expected_reports]
    for r, e in zip(reports, expected_reports, strict=True):
        assert r.num_letters == e.num_letters
        if e.relative_error is not None:  # sums in another order: float32 rounding
            np.testing.assert_allclose(r.relative_error, e.relative_error, rtol=1e-4, atol=1e-6)


def _models():
    batches = _batches()
    nnx_model = NNXDecoder(nnx.Rngs(0))
    out = [(nnx_model,)]
    for model in (LinenDecoder(), LinenListDecoder()):
        out.append((model, model.init(jax.random.key(1), **batches[0])))
    return out


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("framework", ["nnx", "linen", "linen_list"])
def test_block_wise_gives_the_codes_of_layer_by_layer(framework, sequential):
    """Every kernel, quantized block by block from the cached X and X~ (on the host when
    sequential, on the device otherwise), is that of the layer-by-layer schedule; layers before
    and after the blocks included."""
    model = dict(zip(["nnx", "linen", "linen_list"], _models(), strict=True))[framework]
    batches = _batches()
    run = lambda **kw: qjax.quantize_model(
        *model, batches, spec=SPEC, sequential=sequential, progress=False, **kw
    )
    expected, expected_reports = run(schedule="layer_by_layer")
    result, reports = run(schedule="block_wise", offload=sequential)
    _assert_same(result, reports, expected, expected_reports)
    blocks = [r.block for r in reports if r.block is not None]
    names = {"nnx": "blocks/{}", "linen": "LinenBlock_{}", "linen_list": "layers_{}"}[framework]
    assert [b.path for b in dict.fromkeys(blocks)] == [names.format(i) for i in range(BLOCKS)]
    assert all(b.layers == 3 and b.seconds > 0 and b.memory_bytes > 0 for b in blocks)
    for r in reports:  # the layers outside the blocks have no block
        assert (r.block is None) == (r.path.split("/")[0] in ("proj", "head"))
    assert "| block | layers | time (s) | memory (MiB) |" in qjax.format_report(reports)


def test_blocks_of_one_structure_share_one_compiled_pass():
    """The blocks' passes are one program (compiled for the first block); a second model of
    twice the depth compiles only its passes before and after the blocks."""
    batches = _batches()
    qjax.quantize_model(NNXDecoder(nnx.Rngs(0)), batches, schedule="block_wise", progress=False)
    before = nnx_adapter._paired_pass.cache_info()
    deeper = NNXDecoder(nnx.Rngs(1), blocks=2 * BLOCKS)
    qjax.quantize_model(deeper, batches, schedule="block_wise", progress=False)
    after = nnx_adapter._paired_pass.cache_info()
    assert after.hits - before.hits == 2 * 2 * BLOCKS  # every block: its pass and its memory
    assert after.misses - before.misses == 2


class NNXChain(nnx.Module):
    """Dense layers with ReLU as a list of blocks between an input and an output layer."""

    def __init__(self, rngs):
        self.fc_in = nnx.Linear(10, 16, rngs=rngs)
        self.blocks = nnx.List([_ReluLinear(rngs) for _ in range(2)])
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.fc_in(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _ReluLinear(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.fc(x))


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
def test_block_wise_codes_equal_the_numpy_reference(method):
    """The float64 NumPy transcription of the papers (tests/test_engine_reference.py) gives the
    block-wise schedule's letters, up to near-ties within float32 error."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 10)))
    module = NNXChain(nnx.Rngs(0))
    state = _randomized(nnx.state(module, nnx.Param), jax.random.key(2))
    nnx.update(module, state)
    new, _ = qjax.quantize_model(
        module,
        [x[:32], x[32:]],
        spec=LayerSpec(method=method, num_letters=4, c=0.8, rule="max"),
        schedule="block_wise",
        progress=False,
    )
    names = {"in": "fc_in", "b0": "blocks/0/fc", "b1": "blocks/1/fc", "head": "head"}

    def params(m):
        flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(m))}
        return {
            short: {"kernel": flat[f"{long}/kernel"], "bias": flat[f"{long}/bias"]}
            for short, long in names.items()
        }

    layers = [DenseLayer(n, relu=n != "head") for n in names]
    assert_engine_equals_reference(
        layers, params(module), params(new), x, method=method, alphabet=scaled(4)
    )


def test_auto_picks_block_wise_when_one_pass_would_not_fit(monkeypatch):
    """ "auto" runs one pass while the estimated activations fit the budget, and block by block
    (same codes) when they do not; a model without blocks stays in one pass."""
    model, batches = NNXDecoder(nnx.Rngs(0)), _batches()
    one, one_reports = qjax.quantize_model(model, batches, spec=SPEC, progress=False)
    assert all(r.block is None for r in one_reports)
    offloaded, reports = qjax.quantize_model(
        model, batches, spec=SPEC, offload=True, progress=False
    )  # asks for block-wise
    assert sum(r.block is not None for r in reports) == 3 * BLOCKS
    _assert_same(offloaded, reports, one, one_reports)
    monkeypatch.setattr(engine, "_one_pass_budget", lambda: 1024)
    result, reports = qjax.quantize_model(model, batches, spec=SPEC, progress=False)
    assert sum(r.block is not None for r in reports) == 3 * BLOCKS
    _assert_same(result, reports, one, one_reports)
    unchained = _Unchained(nnx.Rngs(0))
    _, reports = qjax.quantize_model(unchained, jnp.ones((4, 16)), spec=SPEC, progress=False)
    assert all(r.block is None for r in reports)


def test_one_pass_activation_estimate():
    """The estimate is every layer's input over the whole calibration set, twice when
    sequential: here (proj, 3 × (attn, up, down), head) inputs of 7 × 5 positions."""
    model, batches = NNXDecoder(nnx.Rngs(0)), _batches()
    adapter = engine.NNXAdapter(model, engine.ModelCall())
    first = engine._Batches(batches, None, {}).first()
    found = adapter.layers(first)
    calls = adapter.module_calls(first)
    widths = D + BLOCKS * (D + D + HIDDEN) + D
    per_example = SEQ * widths * 4  # float32 bytes
    for sequential in (True, False):
        got = engine._one_pass_bytes(calls, found, 7 / 4, sequential=sequential)
        assert got == 7 * per_example * (2 if sequential else 1)


def test_llama_blocks_are_found_and_quantized_as_layer_by_layer():
    """qjax.models.llama.Llama: every projection of every decoder layer in a block, the head
    after them; the codes of the one-pass schedule (itself equal to layer by layer), with a
    layer inside a block and the head kept float."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (3, 8), 0, 32)
    rules = [("layers/1/mlp/up_proj|lm_head", LayerSpec(method="skip"))]
    run = lambda schedule: qjax.quantize_model(
        model,
        tokens,
        spec=LayerSpec(method="gpfq", bits=4, group_size=8),
        rules=rules,
        schedule=schedule,
        progress=False,
    )
    result, reports = run("block_wise")
    _assert_same(result, reports, *run("one_pass"))
    assert [r.block.path if r.block else None for r in reports] == [
        *["layers/0"] * 7,
        *["layers/1"] * 7,
        None,
    ]
    assert [r.method for r in reports].count("skip") == 2


class _Unchained(nnx.Module):
    """Blocks that are not a chain: computation between them."""

    def __init__(self, rngs):
        self.blocks = nnx.List([_ReluLinear(rngs) for _ in range(2)])

    def __call__(self, x):
        return self.blocks[1](2.0 * self.blocks[0](x))


def test_clear_errors():
    x = jnp.ones((4, 16))
    for kwargs in ({"schedule": "block_wise"}, {"offload": True}):
        with pytest.raises(ValueError, match="needs a model built of a chain of blocks"):
            qjax.quantize_model(_Unchained(nnx.Rngs(0)), x, progress=False, **kwargs)
    with pytest.raises(ValueError, match="give schedule= or its former spelling one_pass="):
        qjax.quantize_model(_Unchained(nnx.Rngs(0)), x, schedule="one_pass", one_pass=True)
    with pytest.raises(ValueError, match="schedule must be one of"):
        qjax.quantize_model(_Unchained(nnx.Rngs(0)), x, schedule="blockwise")
    with pytest.raises(ValueError, match="offload=True keeps the block-wise"):
        qjax.quantize_model(_Unchained(nnx.Rngs(0)), x, schedule="one_pass", offload=True)
    with pytest.raises(ValueError, match="runs on one device"):
        qjax.quantize_model(
            NNXChain(nnx.Rngs(0)),
            jnp.ones((4, 10)),
            schedule="block_wise",
            mesh=qjax.make_mesh(),
            progress=False,
        )


@pytest.mark.slow
def test_depth_scaling_benchmark_prints_its_table():
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.depth_scaling", "--small"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "| block_wise | 4 | 29 |" in out
    assert "| one_pass | 2 | 15 |" in out
    assert "block_wise: time 4/2 blocks = " in out
