"""A Llama-family decoder in Flax NNX, read from and written to Hugging Face checkpoints.

One module for the decoders that share Llama's block (Llama 2/3, Mistral, Qwen 2, Qwen 3):

    x = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rms_norm(x)
    x = x + down_proj(silu(gate_proj(n)) · up_proj(n)),                        n = rms_norm(x)

with rotary position embeddings (RoPE: the "rotate half" form of Hugging Face, Llama 3's
frequency scaling or linear scaling), grouped-query attention (num_key_value_heads ≤
num_attention_heads), optional biases on the attention projections (Qwen 2), optional RMSNorm of
each query and key head (Qwen 3), optional sliding-window attention (Mistral), and a head tied to
the token embedding or not. Every projection is an `nnx.Linear` (kernel: inputs × outputs), so
`qjax.quantize_model` quantizes them all.

Paths follow the checkpoint's names with the "model." prefix dropped: "layers/3/self_attn/q_proj"
is `model.layers.3.self_attn.q_proj` (its kernel the transposed `weight`), "embed_tokens", "norm",
"lm_head". `from_pretrained` reads `config.json` and the safetensors weights (one file or shards;
float32, bfloat16 or float16) tensor by tensor into a model built without weights, so the
checkpoint is never held twice; `save_pretrained` writes a checkpoint that `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.llm import checkpoint
from qjax.models.transformer import check_tokens
from qjax.rules import path_name

__all__ = [
    "Llama",
    "LlamaConfig",
    "build",
    "from_pretrained",
    "hf_name",
    "parameters",
    "read_config",
    "save_pretrained",
    "state_dict",
]

# model_type → (biases of q/k/v, bias of o, q/k norm); other keys are read from config.json.
_FAMILIES = {
    "llama": None,  # attention_bias (q, k, v and o), mlp_bias
    "mistral": None,
    "qwen2": (True, False, False),
    "qwen3": None,  # attention_bias, and q/k norm
}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and options of a `Llama`, named as in Hugging Face's `config.json`.

    Attributes:
      vocab_size: number of tokens.
      hidden_size: residual width d.
      intermediate_size: hidden width of the SwiGLU MLP.
      num_hidden_layers: decoder blocks.
      num_attention_heads: query heads.
      num_key_value_heads: key/value heads (grouped-query attention); must divide the query heads.
      head_dim: width of one head (hidden_size / num_attention_heads unless given).
      rms_norm_eps: ε of every RMSNorm.
      rope_theta: RoPE base θ.
      rope_scaling: None, or {"rope_type": "linear", "factor": f} or Llama 3's {"rope_type":
        "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}.
      max_position_embeddings: the longest sequence.
      tie_word_embeddings: logits through the transposed token embedding, no `lm_head`.
      qkv_bias: biases on q_proj, k_proj, v_proj.
      o_bias: bias on o_proj.
      mlp_bias: biases on the MLP projections.
      qk_norm: RMSNorm over head_dim of each query and key head before RoPE (Qwen 3).
      sliding_windows: per layer, None (full causal attention) or a window w: position i sees
        positions j with i - w < j ≤ i.
      model_type: the family ("llama", "mistral", "qwen2", "qwen3"), written back to config.json.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] | None = None
    model_type: str = "llama"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                    f"({self.hidden_size}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r}; qjax implements {_ROPE_TYPES}")
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling, rope_type=rope_type))
            if rope_type == "default":
                object.__setattr__(self, "rope_scaling", None)
        if self.sliding_windows is None:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        object.__setattr__(self, "sliding_windows", tuple(self.sliding_windows))
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    def __hash__(self):  # rope_scaling is a dict: hash its items
        fields = dataclasses.astuple(dataclasses.replace(self, rope_scaling=None))
        return hash((fields, json.dumps(self.rope_scaling, sort_keys=True)))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """The configuration of a Hugging Face `config.json` (as a dict).

        Raises:
          ValueError: a model type other than llama, mistral, qwen2, qwen3, or an option qjax
            does not implement (rope types other than default/linear/llama3).
        """
        model_type = config.get("model_type")
        if model_type not in _FAMILIES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama-family decoder qjax reads; "
                f"supported: {sorted(_FAMILIES)}"
            )
        # transformers ≥ 5 keeps θ and the scaling in "rope_parameters".
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not implemented")
        layers = config["num_hidden_layers"]
        window = config.get("sliding_window")
        if "layer_types" in config and config["layer_types"] is not None:
            windows = tuple(
                window if kind == "sliding_attention" else None for kind in config["layer_types"]
            )
        elif model_type == "mistral":
            windows = (window,) * layers
        elif config.get("use_sliding_window"):
            raise ValueError("Qwen sliding-window layers without layer_types are not implemented")
        else:
            windows = (None,) * layers
        bias = config.get("attention_bias", False)
        qkv_bias, o_bias, qk_norm = _FAMILIES[model_type] or (bias, bias, model_type == "qwen3")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=config.get("mlp_bias", False),
            qk_norm=qk_norm,
            sliding_windows=windows,
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for this configuration (float32 weights)."""
        windows = {w for w in self.sliding_windows if w is not None}
        if len(windows) > 1:
            raise ValueError("Hugging Face configs hold one sliding window for all layers")
        if self.qkv_bias != self.o_bias and self.model_type != "qwen2":
            raise ValueError(f"{self.model_type} has one attention_bias for q, k, v and o")
        architecture = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope.update(self.rope_scaling or {})
        config = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        }
        if windows:
            config["sliding_window"] = windows.pop()
            config["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in self.sliding_windows
            ]
            config["use_sliding_window"] = True
        return config


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies θ^(-2i/head_dim), i < head_dim/2, after the config's scaling.

    Llama 3 scaling divides the low frequencies (wavelength > original context / low_freq_factor)
    by `factor`, keeps the high ones (wavelength < original context / high_freq_factor) and
    interpolates in between; linear scaling divides all by `factor`.
    """
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in the "rotate half" layout: x·cos + (-x₂, x₁)·sin over the last axis."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(config: LlamaConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs, dtype):
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=bias,
        kernel_init=nnx.initializers.normal(0.02),
        param_dtype=dtype,
        dtype=dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE (and optional q/k norm, sliding window)."""

    def __init__(self, config: LlamaConfig, *, window: int | None, rngs: nnx.Rngs, dtype):
        d, heads, kv, dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.config, self.window = config, window
        self.q_proj = _linear(config, d, heads * dim, config.qkv_bias, rngs, dtype)
        self.k_proj = _linear(config, d, kv * dim, config.qkv_bias, rngs, dtype)
        self.v_proj = _linear(config, d, kv * dim, config.qkv_bias, rngs, dtype)
        self.o_proj = _linear(config, heads * dim, d, config.o_bias, rngs, dtype)
        if config.qk_norm:
            norm = dict(epsilon=config.rms_norm_eps, param_dtype=dtype, dtype=dtype, rngs=rngs)
            self.q_norm = nnx.RMSNorm(dim, **norm)
            self.k_norm = nnx.RMSNorm(dim, **norm)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        config = self.config
        batch, length, _ = x.shape
        heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q = self.q_proj(x).reshape(batch, length, heads, dim)
        k = self.k_proj(x).reshape(batch, length, kv, dim)
        v = self.v_proj(x).reshape(batch, length, kv, dim)
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotate(q, cos, sin).astype(v.dtype)
        k = _rotate(k, cos, sin).astype(v.dtype)
        q = q.reshape(batch, length, kv, heads // kv, dim)  # query head h reads kv head h // G
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(dim)
        i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
        visible = j <= i
        if self.window is not None:
            visible &= j > i - self.window
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
        return self.o_proj(out.reshape(batch, length, heads * dim))


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) · up_proj(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype):
        d, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, d, hidden, bias, rngs, dtype)
        self.up_proj = _linear(config, d, hidden, bias, rngs, dtype)
        self.down_proj = _linear(config, hidden, d, bias, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-RMSNorm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, window: int | None, rngs: nnx.Rngs, dtype):
        norm = dict(epsilon=config.rms_norm_eps, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, window=window, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    """Llama-family decoder: token ids → next-token logits.

    Submodules: `embed_tokens` (nnx.Embed), `layers` (a list of `DecoderLayer`), `norm`
    (nnx.RMSNorm) and `lm_head` (nnx.Linear, no bias) unless `config.tie_word_embeddings`.

    Args:
      config: the sizes and options.
      rngs: its 'params' stream initializes the weights (N(0, 0.02²) kernels and embeddings).
      dtype: the dtype of the parameters and of the computation (attention softmax and RMSNorm
        statistics run in float32 whatever it is).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=nnx.initializers.normal(0.02),
            param_dtype=dtype,
            dtype=dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(config, window=window, rngs=rngs, dtype=dtype)
                for window in config.sliding_windows
            ]
        )
        self.norm = nnx.RMSNorm(
            config.hidden_size,
            epsilon=config.rms_norm_eps,
            param_dtype=dtype,
            dtype=dtype,
            rngs=rngs,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config, config.hidden_size, config.vocab_size, False, rngs, dtype)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: (batch, time) integer ids, time ≤ config.max_position_embeddings (ids are not
            checked here: they may be traced).

        Returns:
          (batch, time, vocab_size) float32 logits; position t sees tokens 0..t only.
        """
        length = check_tokens(
            tokens, self.config.max_position_embeddings, limit="max_position_embeddings"
        )
        inv_freq = jnp.asarray(rope_frequencies(self.config), jnp.float32)
        angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # (time, 1, head_dim)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_name(path: str) -> str:
    """The checkpoint name of a parameter path: "layers/0/mlp/up_proj/kernel" →
    "model.layers.0.mlp.up_proj.weight" (a kernel is the transposed weight)."""
    *module, leaf = path.split("/")
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"{path!r} is not a parameter path of a Llama model")
    prefix = [] if module == ["lm_head"] else ["model"]
    return ".".join([*prefix, *module, _LEAF_NAMES[leaf]])


def parameters(model: Llama) -> list[tuple[str, nnx.Variable]]:
    """(path, Variable) of every parameter, paths as `qjax.rules.path_name`."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return [(path_name(keypath), variable) for keypath, variable in leaves]


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory, as a dict."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(file) as f:
        return json.load(f)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> Llama:
    """The `Llama` of a Hugging Face checkpoint directory.

    The model is built without weights (`nnx.eval_shape`); each tensor is then read from the
    memory-mapped safetensors (`qjax.llm.checkpoint.CheckpointReader`), transposed if it is a
    kernel, converted to `dtype` and placed, one at a time.

    Args:
      path: a directory with `config.json` and `model.safetensors` (or sharded
        `model.safetensors.index.json` + shards), float32, bfloat16 or float16.
      dtype: the parameters' dtype in qjax.

    Returns:
      The model.

    Raises:
      ValueError: an unsupported config; a tensor missing from the checkpoint, of the wrong
        shape, or not used by the model (a quantized checkpoint, another architecture).
    """
    path = os.fspath(path)
    reader = checkpoint.CheckpointReader(path)
    return build(read_config(path), reader.__getitem__, reader.names, dtype=dtype, source=path)


def build(
    config: Mapping[str, Any],
    tensor: Callable[[str], np.ndarray],
    names: Sequence[str],
    *,
    dtype=jnp.float32,
    source: str = "the checkpoint",
) -> Llama:
    """A `Llama` of a `config.json` dict whose weights come one by one from `tensor(name)`.

    Args:
      config: the Hugging Face config dict.
      tensor: the (out, in)-layout tensor of a checkpoint name ("model.norm.weight").
      names: every name the checkpoint holds (names the model does not use are an error).
      dtype: the parameters' dtype.
      source: the checkpoint, for error messages.
    """
    config = LlamaConfig.from_hf(config)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))
    available = set(names)
    for name_path, variable in parameters(model):
        name = hf_name(name_path)
        if name not in available:
            raise ValueError(f"{source} has no tensor {name!r} ({name_path})")
        value = tensor(name)
        if name_path.endswith("/kernel"):
            value = value.T
        expected = variable.get_value().shape
        if value.shape != expected:
            raise ValueError(
                f"tensor {name!r} has shape {value.shape}, the model expects {expected}"
            )
        variable.set_value(jnp.asarray(value.astype(dtype)))
        available.discard(name)
    # Tied checkpoints may still store lm_head.weight (a copy of the embedding).
    unused = sorted(
        n for n in available if not (config.tie_word_embeddings and n == "lm_head.weight")
    )
    if unused:
        raise ValueError(
            f"{source} has tensors the model does not use: {unused[:5]}"
            f"{' ...' if len(unused) > 5 else ''}"
        )
    return model


def state_dict(model: Llama, *, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face state dict of NumPy arrays (kernels transposed),
    leaving out the parameter paths in `skip`."""
    tensors = {}
    for name_path, variable in parameters(model):
        if name_path in skip:
            continue
        value = np.asarray(variable.get_value())
        tensors[hf_name(name_path)] = value.T if name_path.endswith("/kernel") else value
    return tensors


def save_pretrained(model: Llama, path: str | os.PathLike) -> None:
    """Writes `config.json` and `model.safetensors` that `from_pretrained` and transformers'
    `AutoModelForCausalLM.from_pretrained` read.

    Args:
      model: the model.
      path: the directory (created if missing).
    """
    os.makedirs(path, exist_ok=True)
    config = model.config.to_hf()
    dtypes = {np.asarray(v.get_value()).dtype for _, v in parameters(model)}
    config["torch_dtype"] = str(dtypes.pop()) if len(dtypes) == 1 else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    checkpoint.write_safetensors(
        os.path.join(path, checkpoint.SINGLE_FILE), state_dict(model), {"format": "pt"}
    )
