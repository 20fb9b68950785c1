"""Quantize a trained Flax Linen model layer by layer with GPFQ, MSQ or GPTQ.

`quantize_model` walks the model's Dense and Conv layers in the order the forward pass calls them
and, as in Lybrand & Saab, quantizes layer l knowing two inputs of it on the calibration set:

* X, its input in the float network, and
* X~, its input in the network whose layers 1..l-1 are already quantized.

Both are captured with Flax's method interceptors (`nn.intercept_methods`) while the model runs
on calibration batches, and streamed batch by batch into the layer's `GramStats` (X~ᵀX~, X~ᵀX,
XᵀX), so the calibration set never has to fit in memory. A Conv layer's inputs become its patch
matrices (`qjax.patches.conv_patches`). The new kernel is written into the variables pytree by
path; biases, BatchNorm and every other variable stay as they were.

Per-layer choices (method, alphabet, scale rule, C, per-channel, skip) are `LayerSpec`s selected
by glob patterns on the layer's path, e.g. `{"Dense_2": LayerSpec(method="skip")}`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from qjax import alphabets, sharding
from qjax.alphabets import AnyAlphabet
from qjax.methods.gpfq import _split_channels, gpfq_from_stats
from qjax.methods.gptq import gptq_from_stats
from qjax.methods.msq import msq
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.stats import gram_stats_init, gram_stats_update, relative_error

__all__ = ["LayerReport", "LayerSpec", "format_report", "quantize_model"]

Method = Literal["gpfq", "msq", "gptq", "skip"]
METHODS = ("gpfq", "msq", "gptq", "skip")
Calibration = ArrayLike | Sequence[ArrayLike] | Callable[[], Iterable[ArrayLike]]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How to quantize one layer.

    The alphabet is, in order of precedence: `alphabet` (an alphabet, or a function of the
    kernel returning one); `num_letters` letters R·linspace(-1, 1, n); or the symmetric alphabet
    of `bits` bits (`qjax.alphabets.num_letters_for_bits`: binary, ternary at 2, 2^b - 1 letters
    beyond). R = C·median|W| or C·max|W| (`rule`), per layer or per output channel.

    Attributes:
      method: "gpfq", "msq" (round each weight), "gptq", or "skip" (keep the layer float).
      bits: bit width b, used when neither `num_letters` nor `alphabet` is given.
      num_letters: number of letters n (e.g. 3 for ternary, 2^b for the GPFQ reference code).
      alphabet: an explicit alphabet, or a callable kernel → alphabet.
      c: the scale constant C.
      rule: "median" (Lybrand & Saab) or "max" (Zhang & Saab).
      per_channel: one alphabet per output channel instead of one per layer.
    """

    method: Method = "gpfq"
    bits: int = 4
    num_letters: int | None = None
    alphabet: AnyAlphabet | Callable[[jax.Array], AnyAlphabet] | None = None
    c: float = 1.0
    rule: Literal["median", "max"] = "max"
    per_channel: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def make_alphabet(self, kernel: jax.Array) -> AnyAlphabet:
        """The alphabet A for this kernel (output channels on its last axis)."""
        if self.alphabet is not None:
            return self.alphabet(kernel) if callable(self.alphabet) else self.alphabet
        if self.num_letters is not None:
            return alphabets.for_weights(
                kernel,
                c=self.c,
                num_letters=self.num_letters,
                rule=self.rule,
                per_channel=self.per_channel,
            )
        return alphabets.for_weights(
            kernel, c=self.c, bits=self.bits, rule=self.rule, per_channel=self.per_channel
        )


class LayerReport(NamedTuple):
    """What happened to one layer.

    Attributes:
      path: the layer's module path, e.g. "Dense_0" or "Block_1/Conv_0".
      kind: "Dense" or "Conv".
      method: the method used ("skip": left float, no error computed).
      shape: the kernel's shape.
      num_letters: letters of the alphabet (None when skipped).
      relative_error: ||XW - X~Q||_F / ||XW||_F on the calibration set for the chosen method.
      msq_relative_error: the same error had this layer's weights been rounded (MSQ) instead,
        with the same X~: the reference point.
      seconds: wall time spent on this layer (statistics and quantization).
    """

    path: str
    kind: str
    method: str
    shape: tuple[int, ...]
    num_letters: int | None
    relative_error: float | None
    msq_relative_error: float | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: tuple[str, ...]
    kind: str  # "Dense" or "Conv"
    geometry: ConvGeometry | None

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _calibration_batches(calibration: Calibration) -> Callable[[], Iterator[jax.Array]]:
    """A function that restarts the calibration batches (they are read once per layer)."""
    if callable(calibration):
        return lambda: iter(calibration())
    if hasattr(calibration, "shape"):
        return lambda: iter([calibration])
    if isinstance(calibration, Iterator):
        raise ValueError(
            "calibration is a one-shot iterator, but it is read once per layer: pass an array, "
            "a list of batches, or a function returning a fresh iterator of batches"
        )
    if isinstance(calibration, Sequence) and calibration:
        return lambda: iter(calibration)
    raise ValueError(
        "calibration must be an array, a non-empty list of batches, or a function returning "
        f"an iterator of batches; got {type(calibration).__name__}"
    )


def _checked(batch: ArrayLike, first_shape: tuple[int, ...] | None) -> jax.Array:
    batch = jnp.asarray(batch)
    if not jnp.issubdtype(batch.dtype, jnp.floating):
        raise ValueError(
            f"calibration batches must be floating point (normalize images first), "
            f"got dtype {batch.dtype}"
        )
    if batch.ndim < 1 or batch.shape[0] == 0:
        raise ValueError(f"calibration batch has shape {batch.shape}: no examples")
    if first_shape is not None and batch.shape[1:] != first_shape[1:]:
        raise ValueError(
            f"calibration batch of shape {batch.shape} differs from the first batch "
            f"{first_shape} beyond the batch axis"
        )
    if not bool(jnp.all(jnp.isfinite(batch))):
        raise ValueError("calibration batch contains NaN or Inf")
    return batch


def _kernel_paths(params: Mapping) -> list[tuple[str, ...]]:
    """Module paths of every parameter named "kernel"."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [tuple(k.key for k in keypath) for keypath, _ in leaves]
    return [p[:-1] for p in paths if p[-1] == "kernel"]


def _discover_layers(model: nn.Module, variables, batch, apply_kwargs) -> list[_Layer]:
    """The Dense and Conv layers in call order, checked against the kernels in the params."""
    calls: dict[tuple[str, ...], nn.Module] = {}
    counts: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = tuple(context.module.path)
            calls.setdefault(path, context.module)
            counts[path] = counts.get(path, 0) + 1
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(record):
            jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, batch)
    except (TypeError, ValueError, flax.errors.FlaxError) as error:
        raise ValueError(
            f"calibration batches of shape {batch.shape} do not fit the model: {error}"
        ) from error

    layers = []
    kernel_paths = set(_kernel_paths(variables["params"]))
    for path, module in calls.items():
        if path not in kernel_paths:
            continue
        if counts[path] > 1:
            layers.append(_Layer(path, "shared", None))
        elif isinstance(module, nn.Dense):
            layers.append(_Layer(path, "Dense", None))
        elif isinstance(module, nn.Conv):
            layers.append(_Layer(path, "Conv", ConvGeometry.from_module(module)))
        else:
            layers.append(_Layer(path, type(module).__name__, None))
    for path in sorted(kernel_paths - set(calls)):
        layers.append(_Layer(path, "uncalled", None))
    return layers


def _spec_for(layer: _Layer, spec: LayerSpec, overrides: Mapping[str, LayerSpec]) -> LayerSpec:
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(layer.name, pattern):
            return override
    return spec


def _get_kernel(variables, path: tuple[str, ...]) -> jax.Array:
    node = variables["params"]
    for key in path:
        node = node[key]
    return node["kernel"]


def _replace_kernel(variables, path: tuple[str, ...], kernel: jax.Array):
    target = ("params", *path, "kernel")

    def replace(keypath, leaf):
        return kernel if tuple(k.key for k in keypath) == target else leaf

    return jax.tree_util.tree_map_with_path(replace, variables)


def _layer_input(model, layer: _Layer, apply_kwargs: tuple, variables, batch) -> jax.Array:
    """The rows the layer sees: (m, N0) for Dense, (groups, m, N0g) patches for Conv."""
    captured = []

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == layer.path:
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply(variables, batch, **dict(apply_kwargs))
    x = captured[0]
    if layer.kind == "Conv":
        return conv_patches(x, layer.geometry)
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _input_rows(model, layer: _Layer, apply_kwargs: tuple, float_variables, variables, batch):
    """(X rows, X~ rows) of `layer` for one calibration batch; compiled once per layer."""
    return (
        _layer_input(model, layer, apply_kwargs, float_variables, batch),
        _layer_input(model, layer, apply_kwargs, variables, batch),
    )


def _as_matrix(kernel: jax.Array, layer: _Layer) -> jax.Array:
    return kernel_to_matrix(kernel, layer.geometry) if layer.kind == "Conv" else kernel


def _as_kernel(matrix: jax.Array, layer: _Layer) -> jax.Array:
    return matrix_to_kernel(matrix, layer.geometry) if layer.kind == "Conv" else matrix


def _on_this_process(tree, mesh: Mesh):
    """A whole copy, on one of this process's devices, of each global array of `tree` on `mesh`."""
    replicated = jax.device_put(tree, NamedSharding(mesh, P()))
    return jax.tree.map(lambda a: a.addressable_data(0), replicated)


def quantize_model(
    model: nn.Module,
    variables: Mapping[str, Any],
    calibration: Calibration,
    *,
    spec: LayerSpec = LayerSpec(),
    layers: Mapping[str, LayerSpec] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[Any, list[LayerReport]]:
    """Quantizes every Dense and Conv kernel of a Linen model, in call order.

    Layer l's quantizer sees X (its input in the float model) and X~ (its input in the model
    whose earlier layers are quantized), accumulated over all calibration batches into
    `GramStats`; GPFQ runs `gpfq_from_stats`, GPTQ `gptq_from_stats`, MSQ rounds each weight.

    Args:
      model: the Linen module.
      variables: its trained variables ({"params": ..., "batch_stats": ..., ...}).
      calibration: the calibration inputs, already preprocessed as `model.apply` expects: one
        array (one batch), a list of batches, or a function returning a fresh iterator of
        batches (each layer reads all of them once).
      spec: the `LayerSpec` of every layer not matched by `layers`.
      layers: glob pattern on the layer path ("Dense_2", "Conv_*", "*/Dense_0") → `LayerSpec`;
        the first matching pattern wins. Every pattern must match a layer.
      apply_kwargs: extra keyword arguments of `model.apply` (e.g. {"train": False}).
      mesh: quantize over these devices with `qjax.sharding` (`sharding.make_mesh()`: all
        devices of all processes): each layer's statistics are summed data-parallel and GPFQ's
        neurons are split over the mesh; the codes are those of the unsharded run. The forward
        passes that capture X and X~ run where `variables` and the batches are (by default this
        process's first device), and the quantized kernels come back there. On several hosts,
        every process passes its own calibration batches, the same number of them.
      progress: show a progress bar over layers.

    Returns:
      (new variables with quantized kernels, one `LayerReport` per layer in call order).

    Raises:
      ValueError: a pattern that matches no layer; a layer with a kernel that is not skipped
        and is neither nn.Dense nor nn.Conv, or is called never or twice by the forward pass;
        calibration inputs that are not floating, finite, or of the shape the model takes.
    """
    overrides = dict(layers or {})
    apply_kwargs = dict(apply_kwargs or {})
    if "params" not in variables:
        raise ValueError(f"variables must have a 'params' collection, got {list(variables)}")
    for pattern, override in overrides.items():
        if not isinstance(override, LayerSpec):
            raise ValueError(f"layers[{pattern!r}] must be a LayerSpec, got {override!r}")
    batches = _calibration_batches(calibration)
    first = _checked(next(batches()), None)
    found = _discover_layers(model, variables, first, apply_kwargs)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Dense or Conv layer to quantize")
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in found):
            known = ", ".join(layer.name for layer in found)
            raise ValueError(f"layer pattern {pattern!r} matches no layer; layers: {known}")
    for layer in found:
        if (
            layer.kind not in ("Dense", "Conv")
            and _spec_for(layer, spec, overrides).method != "skip"
        ):
            why = {
                "uncalled": "is never called",
                "shared": "is called more than once (shared layers are not supported)",
            }.get(layer.kind, f"is a {layer.kind}")
            raise ValueError(
                f"layer {layer.name} {why}: only nn.Dense and nn.Conv can be quantized; "
                f"skip it with layers={{{layer.name!r}: LayerSpec(method='skip')}}"
            )

    float_variables = variables
    static_kwargs = tuple(sorted(apply_kwargs.items()))
    current = variables
    reports = []
    for layer in tqdm(found, desc="quantizing layers", disable=not progress):
        layer_spec = _spec_for(layer, spec, overrides)
        kernel = _get_kernel(current, layer.path)
        if layer_spec.method == "skip":
            reports.append(
                LayerReport(layer.name, layer.kind, "skip", kernel.shape, None, None, None, 0.0)
            )
            continue
        start = time.perf_counter()
        matrix = _as_matrix(kernel, layer)
        n0, batch_shape = matrix.shape[-2], matrix.shape[:-2]
        if mesh is None:
            stats = gram_stats_init(n0, batch_shape=batch_shape, track_error=True)
            update = gram_stats_update
        else:
            stats = sharding.gram_stats_init(
                n0, mesh=mesh, batch_shape=batch_shape, track_error=True
            )
            update = sharding.gram_stats_update
        for batch in batches():
            x, x_tilde = _input_rows(
                model, layer, static_kwargs, float_variables, current, _checked(batch, first.shape)
            )
            stats = update(stats, x, x_tilde)
        alphabet = layer_spec.make_alphabet(kernel)
        matrix_alphabet = (
            _split_channels(alphabet, matrix.shape[0]) if layer.kind == "Conv" else alphabet
        )
        if mesh is not None:  # GPTQ, MSQ and the errors use the combined statistics
            sharded_stats, stats = stats, _on_this_process(sharding.combine_stats(stats), mesh)
        rounded = _as_matrix(msq(kernel, alphabet), layer)
        if layer_spec.method == "gpfq" and mesh is not None:
            q = sharding.gpfq_from_stats(matrix, sharded_stats, matrix_alphabet)
            q = _on_this_process(q, mesh)
        elif layer_spec.method == "gpfq":
            q = gpfq_from_stats(matrix, stats, matrix_alphabet)
        elif layer_spec.method == "gptq":
            q = gptq_from_stats(matrix, stats, matrix_alphabet)
        else:
            q = rounded
        error = float(relative_error(matrix, q, stats))
        msq_error = float(relative_error(matrix, rounded, stats))
        current = _replace_kernel(current, layer.path, _as_kernel(q, layer).astype(kernel.dtype))
        seconds = time.perf_counter() - start
        reports.append(
            LayerReport(
                layer.name,
                layer.kind,
                layer_spec.method,
                tuple(kernel.shape),
                alphabet.size,
                error,
                msq_error,
                seconds,
            )
        )
        logging.info(
            "%s %s: relative error %.4f (MSQ %.4f), %d letters, %.1fs",
            layer.name,
            layer_spec.method,
            error,
            msq_error,
            alphabet.size,
            seconds,
        )
    return current, reports


def format_report(reports: Sequence[LayerReport]) -> str:
    """A Markdown table of `quantize_model`'s per-layer report."""
    lines = [
        "| layer | kind | kernel | method | letters | rel. error | MSQ rel. error | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        fmt = lambda v: "–" if v is None else f"{v:.4f}"
        lines.append(
            f"| {r.path} | {r.kind} | {'×'.join(map(str, r.shape))} | {r.method} | "
            f"{r.num_letters or '–'} | {fmt(r.relative_error)} | {fmt(r.msq_relative_error)} | "
            f"{r.seconds:.1f} |"
        )
    return "\n".join(lines)
