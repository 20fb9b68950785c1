"""The Llama-family decoder against transformers, and its checkpoint reading and writing."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax.llm import checkpoint
from qjax.models import llama


def _hf():
    """The tiny-checkpoint helpers; skips the test without PyTorch and transformers."""
    return pytest.importorskip("tests.hf_tiny")


# float32 logits of a 2-layer model: each a sum of ~100 products of O(1) terms, so rounding errors
# are ~1e-6; 1e-4 catches any wrong transpose, norm, bias, RoPE frequency or mask.
TOL = 1e-4


@pytest.mark.parametrize("family", ["llama3", "llama_bias", "mistral", "qwen2", "qwen3"])
def test_logits_match_transformers(family, tmp_path):
    hf = _hf()
    assert family in hf.FAMILIES
    hf.save(family, tmp_path)
    tokens = hf.tokens()
    model = llama.from_pretrained(tmp_path)
    expected = hf.logits(tmp_path, tokens)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=TOL, rtol=0)


def test_sharded_bfloat16_checkpoint(tmp_path):
    hf = _hf()
    # bfloat16 weights in several shards: qjax reads them to float32 exactly as transformers does.
    hf.save("qwen3", tmp_path, dtype=hf.torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / checkpoint.INDEX_FILE).exists()
    tokens = hf.tokens(seed=1)
    model = llama.from_pretrained(tmp_path)
    assert model.lm_head.kernel.get_value().dtype == jnp.float32
    expected = hf.logits(tmp_path, tokens)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=TOL, rtol=0)


def test_float16_checkpoint_kept_in_bfloat16(tmp_path):
    hf = _hf()
    hf.save("llama_bias", tmp_path, dtype=hf.torch.float16)
    model = llama.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    reader = checkpoint.CheckpointReader(tmp_path)
    kernel = model.layers[1].mlp.up_proj.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    expected = reader["model.layers.1.mlp.up_proj.weight"].T.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected.astype(jnp.bfloat16))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_save_pretrained_round_trip_through_transformers(family, tmp_path):
    hf = _hf()
    # A model built in qjax, written by qjax and read by transformers computes the same logits.
    hf.save(family, tmp_path / "source")
    config = llama.LlamaConfig.from_hf(json.loads((tmp_path / "source/config.json").read_text()))
    model = llama.Llama(config, rngs=nnx.Rngs(3))
    llama.save_pretrained(model, tmp_path / "out")
    tokens = hf.tokens(seed=2)
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(hf.logits(tmp_path / "out", tokens), ours, atol=TOL, rtol=0)
    again = llama.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens))), ours)


def test_rope_frequencies_llama3_against_formula():
    config = llama.LlamaConfig(
        vocab_size=8,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    wavelength = 2 * np.pi / base
    expected = []
    for f, lam in zip(base, wavelength, strict=True):
        if lam < 64 / 4:  # high frequencies: unchanged
            expected.append(f)
        elif lam > 64 / 1:  # low frequencies: divided by the factor
            expected.append(f / 8)
        else:
            s = (64 / lam - 1) / (4 - 1)
            expected.append((1 - s) * f / 8 + s * f)
    np.testing.assert_allclose(llama.rope_frequencies(config), expected, rtol=1e-12)


def test_unknown_family_and_missing_tensor(tmp_path):
    hf = _hf()
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        llama.LlamaConfig.from_hf({"model_type": "gemma"})
    hf.save("llama_bias", tmp_path)
    reader = checkpoint.CheckpointReader(tmp_path)
    tensors = {n: np.array(reader[n]) for n in reader.names if "o_proj.bias" not in n}
    del reader  # its files are rewritten below
    checkpoint.write_safetensors(tmp_path / checkpoint.SINGLE_FILE, tensors)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        llama.from_pretrained(tmp_path)


def test_safetensors_round_trip(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c": rng.integers(-8, 8, (2, 2, 2)).astype(np.int8),
    }
    checkpoint.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    reader = checkpoint.CheckpointReader(tmp_path / "x.safetensors")
    assert reader.names == ["a", "b", "c"]
    for name, value in tensors.items():
        assert reader[name].dtype == value.dtype
        np.testing.assert_array_equal(reader[name], value)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    loaded = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(loaded["a"], tensors["a"])
    np.testing.assert_array_equal(loaded["c"], tensors["c"])


def test_bad_tokens_raise():
    config = llama.LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4,
    )
    model = llama.Llama(config, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 11)
    with pytest.raises(ValueError, match="sequence length 5 exceeds max_position_embeddings 4"):
        model(jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"integer ids of shape \(batch, time\)"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"integer ids of shape \(batch, time\)"):
        model(jnp.zeros((4,), jnp.int32))
