"""compressed-tensors checkpoints written by qjax, loaded by transformers: the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import LayerSpec, Rules
from qjax.models import llama

hf = pytest.importorskip("tests.hf_tiny")
compressed = pytest.importorskip("qjax.llm.compressed")
pytest.importorskip("compressed_tensors")

# float32 logits of the same integer weights, dequantized by compressed-tensors in PyTorch and
# by qjax in JAX: rounding differences only (~1e-6).
TOL = 1e-4


def _quantized(family, spec, tmp_path):
    """The float model, its quantized copy and the alphabets, from a tiny checkpoint."""
    hf.save(family, tmp_path / "source")
    model = llama.from_pretrained(tmp_path / "source")
    rules = [] if model.lm_head is None else [("lm_head", LayerSpec(method="skip"))]
    calibration = hf.tokens(batch=4, length=16, seed=5)
    quantized, reports = qjax.quantize_model(
        model, jnp.asarray(calibration), spec=spec, rules=rules, progress=False
    )
    quantized_layers = [r for r in reports if r.method not in ("skip", "not reached")]
    assert len(quantized_layers) == 7 * model.config.num_hidden_layers
    alphabets = compressed.layer_alphabets(model, Rules(rules, default=spec))
    return quantized, alphabets


def _decompressed(path):
    """The float state dict of a pack-quantized checkpoint, decompressed by compressed-tensors."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from qjax.llm import checkpoint

    config = json.loads((path / "config.json").read_text())
    scheme = QuantizationConfig.model_validate(config["quantization_config"]).config_groups[
        "group_0"
    ]
    reader = checkpoint.CheckpointReader(path)
    tensors, layers = {}, {}
    for name in reader.names:
        prefix, _, suffix = name.rpartition(".")
        if suffix.startswith("weight_"):
            layers.setdefault(prefix, {})[suffix] = hf.torch.from_numpy(np.array(reader[name]))
        else:
            tensors[name] = np.array(reader[name])
    for prefix, state in layers.items():
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        tensors[f"{prefix}.weight"] = weight.float().numpy()
    return tensors


@pytest.mark.parametrize(
    ("family", "spec"),
    [
        ("llama3", LayerSpec(method="gptq", bits=4, group_size=16, grid="signed")),
        ("qwen3", LayerSpec(method="gptq", bits=4, group_size=16, grid="asymmetric")),
        ("qwen2", LayerSpec(method="gpfq", bits=8, grid="asymmetric")),
        ("mistral", LayerSpec(method="qronos", bits=4, grid="signed", c=None)),
    ],
)
def test_transformers_loads_the_compressed_checkpoint(family, spec, tmp_path):
    quantized, alphabets = _quantized(family, spec, tmp_path)
    source_config = json.loads((tmp_path / "source/config.json").read_text())
    compressed.save_compressed(
        quantized, tmp_path / "out", alphabets=alphabets, config=source_config
    )

    config = json.loads((tmp_path / "out/config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    assert quantization["quant_method"] == "compressed-tensors"
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == spec.bits
    assert weights["symmetric"] == (spec.grid == "signed")
    assert weights["strategy"] == ("group" if spec.group_size else "channel")
    assert quantization["ignore"] == ["lm_head"]  # skipped, or tied to the float embedding

    tokens = hf.tokens(seed=9)
    ours = np.asarray(quantized(jnp.asarray(tokens)))
    if spec.grid == "signed":
        theirs = hf.logits(tmp_path / "out", tokens)
    else:
        # transformers 5 with compressed-tensors 0.20 cannot load asymmetric pack-quantized
        # checkpoints (llm-compressor's included): its loading template keeps the zero points
        # unpacked while the format packs them. PyTorch computes with the package's own
        # decompression of the file instead.
        theirs = hf.logits_of_tensors(tmp_path / "out", _decompressed(tmp_path / "out"), tokens)
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
    # qjax reads the checkpoint back: the same weights, so the same logits bit for bit.
    again = compressed.load_compressed(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens))), ours)
    # The float model differs from the quantized one by far more than the tolerance.
    float_logits = hf.logits(tmp_path / "source", tokens)
    assert np.abs(float_logits - ours).max() > 100 * TOL


def test_centered_grid_and_off_grid_weights_are_refused(tmp_path):
    spec = LayerSpec(method="msq", bits=4, group_size=16)  # centered: no integer codes
    quantized, alphabets = _quantized("llama3", spec, tmp_path)
    with pytest.raises(ValueError, match="stores integer grids"):
        compressed.save_compressed(quantized, tmp_path / "out", alphabets=alphabets)
    spec = LayerSpec(method="msq", bits=4, group_size=16, grid="signed")
    quantized, alphabets = _quantized("llama3", spec, tmp_path)
    kernel = quantized.layers[0].mlp.up_proj.kernel
    kernel.set_value(kernel.get_value() * 1.01)
    with pytest.raises(ValueError, match=r"layers/0/mlp/up_proj.*off the alphabet"):
        compressed.save_compressed(quantized, tmp_path / "out", alphabets=alphabets)
