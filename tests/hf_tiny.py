"""Tiny random Hugging Face checkpoints (PyTorch CPU) of each Llama family, for the LLM tests.

Every parameter is redrawn (kernels N(0, 0.2²), norms U(0.5, 1.5), biases N(0, 0.1²)) so that a
wrong transpose, norm or bias shows in the logits; `transformers` initialises norms to 1 and
biases to 0, which would hide them.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# family name → (transformers config class, options)
FAMILIES = {
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=True,
        ),
    ),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
}


def make_model(family: str, seed: int = 0):
    """A float32 transformers model of `family` with every parameter redrawn."""
    config_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(**COMMON, **options)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            else:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def save(family: str, directory, *, seed: int = 0, dtype=None, max_shard_size=None) -> None:
    """Writes a tiny checkpoint of `family` to `directory` (optionally cast, optionally sharded)."""
    model = make_model(family, seed)
    if dtype is not None:
        model = model.to(dtype)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **options)


def logits(directory, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits of the checkpoint in `directory` for (batch, time) tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.numpy()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def logits_of_tensors(config_dir, tensors, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits of the architecture in `config_dir`/config.json with the
    float state dict `tensors` (name → NumPy array; every parameter, strictly)."""
    config = transformers.AutoConfig.from_pretrained(config_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    state = {name: torch.from_numpy(np.array(value)) for name, value in tensors.items()}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.numpy()
