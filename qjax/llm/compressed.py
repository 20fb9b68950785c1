"""Writing quantized Llama-family models as `compressed-tensors` checkpoints (`pack-quantized`).

`compressed-tensors` is the format that llm-compressor writes and that `transformers` (with the
`compressed-tensors` package) and vLLM load. Each quantized `Linear` stores, in PyTorch's
(out, in) layout,

* `weight_packed`: the integer codes, 32 / b per int32 word (`pack-quantized`, b ≤ 8);
* `weight_scale`: s, (out, in / g) per group of g inputs ("group") or (out, 1) ("channel");
* `weight_zero_point` (asymmetric only): the zero points, packed along the output axis;
* `weight_shape`: (out, in);

and `config.json` gains a `quantization_config` that names the scheme (bits, symmetric or not,
strategy, group size), the format and the layers left float. A weight is (q - zp)·s with q in
[-2^(b-1), 2^(b-1) - 1]: qjax's signed grid (z = 2^(b-1), zp = 0) and asymmetric grid (integer z
per group, zp = z - 2^(b-1)) are exactly these letters, so the written model computes what the
qjax model computes.

The packing and the config are the `compressed-tensors` package's own
(`PackedQuantizationCompressor`, `QuantizationConfig`, `ModelCompressor.update_config`); qjax
supplies the scales and zero points of its alphabets and checks, layer by layer, that the
package's codes decode to the qjax model's weights exactly. Needs PyTorch and
`compressed-tensors` (`pip install qjax[hf]`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from qjax import export
from qjax.alphabets import UniformAlphabet
from qjax.llm import checkpoint
from qjax.models import llama
from qjax.rules import Rules

__all__ = ["layer_alphabets", "load_compressed", "save_compressed"]


def layer_alphabets(model: llama.Llama, rules: Rules) -> dict[str, UniformAlphabet]:
    """The alphabet of every quantized Linear layer, by layer path ("layers/0/mlp/up_proj").

    The scale rules are data-free (a function of the float kernel), so the alphabets that
    `qjax.quantize_model` used are recomputed from the float model and the same rules.

    Args:
      model: the float model (before quantization).
      rules: the rules given to `quantize_model` (`Rules(rules, default=spec)`).

    Returns:
      path → alphabet, for the layers that are not skipped.
    """
    result = {}
    for path, variable in llama.parameters(model):
        if not path.endswith("/kernel"):
            continue
        layer = path.rsplit("/", 1)[0]
        spec = rules.spec_for(layer)
        if not spec.skip:
            result[layer] = spec.make_alphabet(variable.get_value())
    return result


def _scheme(alphabet: UniformAlphabet, n0: int, layer: str):
    """The compressed-tensors `QuantizationArgs` of an alphabet, or a `ValueError`."""
    from compressed_tensors.quantization import QuantizationArgs

    bits = int(np.log2(alphabet.size))
    if 2**bits != alphabet.size or not 2 <= bits <= 8:
        raise ValueError(
            f"{layer}: compressed-tensors stores 2^b letters with 2 ≤ b ≤ 8, the alphabet has "
            f"{alphabet.size}"
        )
    if alphabet.grid == "centered":
        raise ValueError(
            f"{layer}: compressed-tensors stores integer grids; quantize with "
            "LayerSpec(grid='signed') or grid='asymmetric', not the centered grid"
        )
    step_ndim = np.ndim(alphabet.step)
    if alphabet.group_size is not None:
        if step_ndim != 2 or n0 % alphabet.group_size:
            raise ValueError(
                f"{layer}: group-wise alphabets need a step (⌈N0/g⌉, N1) and g dividing N0 = "
                f"{n0}, got g = {alphabet.group_size}, step {np.shape(alphabet.step)}"
            )
        strategy = {"strategy": "group", "group_size": alphabet.group_size}
    elif step_ndim == 1:
        strategy = {"strategy": "channel"}
    else:
        raise ValueError(
            f"{layer}: compressed-tensors' pack-quantized layers are per channel or group-wise; "
            f"the alphabet has step of shape {np.shape(alphabet.step)}"
        )
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=alphabet.grid == "signed", **strategy
    )


def _compress_layer(kernel: np.ndarray, alphabet: UniformAlphabet, args, layer: str) -> dict:
    """The compressed tensors of one Linear layer (its weight's entries letters of `alphabet`)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    packed = export.quantize_array(kernel, alphabet, name=layer)  # raises if off the alphabet
    scale = np.asarray(packed.scale).reshape(-1, kernel.shape[1]).T  # (out, groups or 1)
    weight = torch.from_numpy(np.ascontiguousarray(kernel.T))
    state = {"weight": weight, "weight_scale": torch.from_numpy(np.ascontiguousarray(scale))}
    if packed.zero_point is not None:
        zero = np.asarray(packed.zero_point).reshape(-1, kernel.shape[1]).T - alphabet.size // 2
        state["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(zero)).to(torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    restored = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    if not torch.equal(restored.to(weight.dtype), weight):
        raise ValueError(
            f"{layer}: compressed-tensors' codes do not decode to the qjax weights (largest "
            f"difference {float((restored - weight).abs().max())})"
        )
    return {name: value.numpy() for name, value in compressed.items()}


def save_compressed(
    model: llama.Llama,
    path: str | os.PathLike,
    *,
    alphabets: Mapping[str, UniformAlphabet],
    config: Mapping | None = None,
) -> None:
    """Writes a quantized `Llama` as a `pack-quantized` compressed-tensors checkpoint.

    Args:
      model: the quantized model (e.g. from `qjax.quantize_model`), float32.
      path: the output directory (created if missing).
      alphabets: the alphabet of each quantized Linear layer by layer path (`layer_alphabets`);
        one scheme for all (same bits, grid and granularity). Layers not named stay float and
        are listed in the config's "ignore".
      config: the source checkpoint's `config.json` dict (kept but for the quantization
        config and dtype); default `model.config.to_hf()`.

    Raises:
      ValueError: a layer whose weights are off its alphabet, a centered (non-integer) grid,
        per-tensor scales, mixed schemes, or a path that is not a Linear layer of the model.
    """
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    parameters = dict(llama.parameters(model))
    kernels = {p.rsplit("/", 1)[0] for p in parameters if p.endswith("/kernel")}
    unknown = sorted(set(alphabets) - kernels)
    if unknown:
        raise ValueError(f"alphabets name layers the model does not have: {unknown}")
    if not alphabets:
        raise ValueError("no quantized layer to write")
    dtypes = {np.asarray(v.get_value()).dtype for v in parameters.values()}
    if dtypes != {np.dtype(np.float32)}:
        raise ValueError(f"save_compressed writes float32 models, got parameter dtypes {dtypes}")
    schemes = {
        layer: _scheme(alphabet, parameters[f"{layer}/kernel"].get_value().shape[0], layer)
        for layer, alphabet in alphabets.items()
    }
    args = next(iter(schemes.values()))
    mixed = sorted(layer for layer, other in schemes.items() if other != args)
    if mixed:
        raise ValueError(f"one scheme for all layers: {mixed} differ from {args}")

    tensors = llama.state_dict(model, skip=[f"{layer}/kernel" for layer in alphabets])
    for layer in sorted(alphabets):
        kernel = np.asarray(parameters[f"{layer}/kernel"].get_value())
        compressed = _compress_layer(kernel, alphabets[layer], args, layer)
        prefix = llama.hf_name(f"{layer}/kernel").removesuffix(".weight")
        tensors.update({f"{prefix}.{name}": value for name, value in compressed.items()})

    os.makedirs(path, exist_ok=True)
    config = dict(model.config.to_hf() if config is None else config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    checkpoint.write_safetensors(
        os.path.join(path, checkpoint.SINGLE_FILE), tensors, {"format": "pt"}
    )
    # Layers left float; a tied head is a Linear in transformers, float here.
    ignore = [
        llama.hf_name(f"{layer}/kernel").removesuffix(".weight")
        for layer in sorted(kernels - set(alphabets))
    ]
    if model.lm_head is None:
        ignore.append("lm_head")
    quantization = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    ModelCompressor(quantization_config=quantization).update_config(os.fspath(path))


def load_compressed(path: str | os.PathLike) -> llama.Llama:
    """The float32 `Llama` of a `pack-quantized` compressed-tensors checkpoint (dequantized).

    Each packed layer is decompressed by the `compressed-tensors` package, one layer at a time,
    so its weights are the letters (q - zp)·s that transformers computes with.

    Args:
      path: a directory written by `save_compressed` or by llm-compressor (pack-quantized).

    Raises:
      ValueError: a checkpoint without a pack-quantized `quantization_config`.
    """
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    path = os.fspath(path)
    config = llama.read_config(path)
    if "quantization_config" not in config:
        raise ValueError(f"{path} has no quantization_config: read it with from_pretrained")
    quantization = QuantizationConfig.model_validate(config["quantization_config"])
    if quantization.format != "pack-quantized" or len(quantization.config_groups) != 1:
        raise ValueError(
            f"{path}: qjax reads pack-quantized checkpoints with one scheme, got format "
            f"{quantization.format!r} and {len(quantization.config_groups)} schemes"
        )
    scheme = next(iter(quantization.config_groups.values()))
    reader = checkpoint.CheckpointReader(path)
    names = set(reader.names)
    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    packed = {n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}

    def tensor(name: str) -> np.ndarray:
        prefix = name.removesuffix(".weight")
        if prefix not in packed:
            return reader[name]
        state = {
            suffix: torch.from_numpy(np.array(reader[f"{prefix}.{suffix}"]))
            for suffix in suffixes
            if f"{prefix}.{suffix}" in names
        }
        return PackedQuantizationCompressor.decompress(state, scheme)["weight"].float().numpy()

    logical = {n for n in names if not n.endswith(suffixes)}
    logical |= {f"{prefix}.weight" for prefix in packed}
    return llama.build(config, tensor, sorted(logical), source=path)
