"""Which layer gets which quantization: paths, patterns and ordered rules.

One path convention for all of qjax (`quantize_model`, `mask_by_path`, `hard_quantize`, export):
a layer or parameter is named by its keys joined with "/", e.g. "block0/attn/query" (a layer),
"block0/attn/query/kernel" (its kernel), "blocks/3/mlp/fc1" (an NNX list entry). Flax NNX state
paths end in the `Variable`'s value ("kernel/value"); that last part is dropped, so a Linen model
and the same model in NNX have the same names. A pattern is a regular expression that must match
the whole path (`re.fullmatch`): "Dense_0", "block[0-9]+/attn/.*", ".*/kernel". A pattern that
matches nothing is an error, never a silent no-op.

`LayerSpec` says how to quantize one layer (method and alphabet); `Rules` is an ordered list of
(pattern, LayerSpec) pairs in which the first match wins, with a default for the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax

from qjax import alphabets
from qjax.alphabets import AnyAlphabet
from qjax.layers import Conv, ConvByChannel, LayerKind
from qjax.methods import base as methods

__all__ = ["LayerSpec", "Rules", "path_name", "path_names", "unmatched_patterns"]


def path_name(keypath: Sequence[Any]) -> str:
    """The "a/b/c" name of a pytree key path (dict keys, attributes, indices; NNX's trailing
    "value" dropped)."""
    parts = []
    for key in keypath:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    nnx_value = isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value"
    if len(parts) > 1 and nnx_value:  # an NNX Variable's value
        parts.pop()
    return "/".join(parts)


def path_names(tree: Any) -> Any:
    """A pytree of `tree`'s structure holding each leaf's `path_name`."""
    return jax.tree_util.tree_map_with_path(lambda keypath, _: path_name(keypath), tree)


def compile_pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled, or a `ValueError` naming it."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid path pattern {pattern!r}: {error}") from error


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that fully match none of `names`."""
    names = list(names)
    return [p for p in patterns if not any(compile_pattern(p).fullmatch(n) for n in names)]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How to quantize one layer: the method, and the alphabet A its weights are rounded to.

    The alphabet is, in order of precedence: `alphabet` (an alphabet, or a function of the layer's
    weight matrix (..., N0, N1) returning one); `num_letters` letters R·linspace(-1, 1, n); or the
    `bits`-bit alphabet of 2^b letters. The radius R = C·max|W| or C·median|W| (`rule`) per
    tensor, per output channel (`per_channel`), or per group of `group_size` inputs of each
    output channel (group-wise, the LLM standard); `c=None` chooses C in each of these scale
    groups to minimise the rounding error ||W - Q(W)||² (data-free).

    Attributes:
      method: a method object (`qjax.GPFQ(block_size=...)`, `qjax.GPTQ(damping=...)`,
        `qjax.MSQ()`, ...), a method's name ("gpfq", "gptq", "msq", ...: its defaults), or "skip"
        (keep the layer float).
      bits: b: alphabets of 2^b letters (codes that fill b bits), used when neither
        `num_letters` nor `alphabet` is given.
      num_letters: number of letters n (3: ternary; 2^b - 1: the symmetric {-K..K}·δ).
      alphabet: an explicit alphabet, or a callable weight matrix → alphabet.
      c: the scale constant C, or None (the MSE-optimal C per scale group).
      rule: "max" (Zhang & Saab, and the usual LLM absmax) or "median" (Lybrand & Saab).
      per_channel: one alphabet per output channel (neuron) instead of one per tensor.
      group_size: g: one alphabet per g consecutive inputs per output channel (32, 64, 128).
      conv_neurons: for convolutions, "patch" (a neuron is an output channel over the whole
        kh·kw·cin patch, Zhang & Saab) or "channel" (a neuron is one (input channel, output
        channel) kh×kw filter over that channel's patch, the GPFQ paper's code).
      grid: where the letters sit (`qjax.alphabets.for_weights`): "centered" (δ·(k - (n-1)/2)),
        "signed" (the signed integers {-2^(b-1)..2^(b-1)-1}·s of integer serving formats) or
        "asymmetric" ((k - z)·s with an integer zero point z per scale group, rule "max").
    """

    method: methods.QuantizationMethod | str = "gpfq"
    bits: int = 4
    num_letters: int | None = None
    alphabet: AnyAlphabet | Callable[[jax.Array], AnyAlphabet] | None = None
    c: float | None = None
    rule: Literal["median", "max"] = "max"
    per_channel: bool = True
    group_size: int | None = None
    conv_neurons: Literal["patch", "channel"] = "patch"
    grid: alphabets.Grid = "centered"

    def __post_init__(self):
        if self.conv_neurons not in ("patch", "channel"):
            raise ValueError(
                f"conv_neurons must be 'patch' or 'channel', got {self.conv_neurons!r}"
            )
        if self.method != "skip":
            methods.get(self.method)  # a clear error for an unknown name
        alphabets.num_letters_for_bits(self.bits)
        if self.c is not None and not self.c > 0:
            raise ValueError(f"the scale constant c must be positive or None, got {self.c}")

    @property
    def skip(self) -> bool:
        return self.method == "skip"

    @property
    def quantizer(self) -> methods.QuantizationMethod:
        """The method object."""
        return methods.get(self.method)

    @property
    def method_name(self) -> str:
        return "skip" if self.skip else self.quantizer.name

    def layer_kind(self, kind: LayerKind) -> LayerKind:
        """The kind the engine quantizes a layer of `kind` as (see `conv_neurons`)."""
        if isinstance(kind, Conv) and self.conv_neurons == "channel":
            return ConvByChannel(kind.geometry)
        return kind

    def make_alphabet(self, matrix: jax.Array) -> AnyAlphabet:
        """The alphabet A for a weight matrix (..., N0, N1): per tensor, one for all of it;
        per channel or group-wise, leading axes (feature groups, heads) have their own."""
        if self.alphabet is not None:
            return self.alphabet(matrix) if callable(self.alphabet) else self.alphabet
        letters = (
            {"num_letters": self.num_letters}
            if self.num_letters is not None
            else {"bits": self.bits}
        )

        def make(m):
            return alphabets.for_weights(
                m,
                c=self.c,
                rule=self.rule,
                per_channel=self.per_channel,
                group_size=self.group_size,
                grid=self.grid,
                **letters,
            )

        if self.per_channel or self.group_size is not None:
            for _ in range(matrix.ndim - 2):
                make = jax.vmap(make)
        return make(matrix)


DEFAULT_SPEC = LayerSpec()


class Rules:
    """An ordered list of (pattern, LayerSpec): a layer gets the spec of the first pattern that
    fully matches its path, else `default`.

    Args:
      rules: (pattern, LayerSpec) pairs in order, or a mapping (its order is kept).
      default: the spec of layers no pattern matches.
    """

    def __init__(
        self,
        rules: Sequence[tuple[str, LayerSpec]] | Mapping[str, LayerSpec] | None = None,
        *,
        default: LayerSpec = DEFAULT_SPEC,
    ):
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules or [])
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"a rule must be a (pattern, LayerSpec) pair, got {pair!r}")
            if not isinstance(pair[1], LayerSpec):
                raise ValueError(f"rule {pair[0]!r} must map to a LayerSpec, got {pair[1]!r}")
        if not isinstance(default, LayerSpec):
            raise ValueError(f"the default spec must be a LayerSpec, got {default!r}")
        self.pairs = [(compile_pattern(p), spec) for p, spec in pairs]
        self.default = default

    def spec_for(self, path: str) -> LayerSpec:
        for pattern, spec in self.pairs:
            if pattern.fullmatch(path):
                return spec
        return self.default

    def check_matches(self, paths: Sequence[str]) -> None:
        """Raises if a pattern matches none of `paths`, listing them."""
        unmatched = unmatched_patterns([p.pattern for p, _ in self.pairs], paths)
        if unmatched:
            raise ValueError(
                f"layer pattern(s) {unmatched} match no layer (patterns must match a whole path, "
                f"re.fullmatch); layers: {', '.join(paths)}"
            )
