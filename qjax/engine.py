"""`quantize_model`: quantize a whole Flax model layer by layer, in call order.

As in Lybrand & Saab, layer l is quantized knowing two inputs of it on the calibration set:

* X, its input in the float network, and
* X~, its input in the network whose layers 1..l-1 are already quantized.

A framework adapter (`qjax.adapters`: Linen, NNX) finds the layers and captures X and X~ batch by
batch; a layer kind (`qjax.layers`) turns them into rows, which are streamed into the layer's
`GramStats` (X~ᵀX~, X~ᵀX, XᵀX), so the calibration set never has to fit in memory; the layer's
method (`qjax.methods`: GPFQ, GPTQ, MSQ, ...) quantizes its weight matrix from them, and the new
kernel is written back. The engine asks neither which framework nor which method it drives.
Layers under `scan` (stacked kernels) are quantized slice by slice, each with its own X and X~.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from qjax.adapters.base import Adapter, Layer
from qjax.adapters.linen import LinenAdapter
from qjax.adapters.nnx import NNXAdapter
from qjax.layers import LayerKind
from qjax.methods.msq import MSQ
from qjax.rules import DEFAULT_SPEC, LayerSpec, Rules
from qjax.stats import (
    GramStats,
    accumulate,
    gram_stats_init,
    gram_stats_update,
    relative_error,
)

__all__ = ["LayerReport", "format_report", "quantize_model"]

Calibration = ArrayLike | Sequence[ArrayLike] | Callable[[], Iterable[ArrayLike]]
RulesLike = Sequence[tuple[str, LayerSpec]] | Mapping[str, LayerSpec]


class LayerReport(NamedTuple):
    """What happened to one layer (one slice of a stacked layer).

    Attributes:
      path: the layer's path, e.g. "Dense_0", "blocks/attn/query"; a slice of a stacked layer
        has its index appended, "blocks/mlp/fc1[3]".
      kind: the layer kind ("Dense", "DenseGeneral", "Einsum", "Conv").
      method: the method's name ("skip": left float, no error computed).
      shape: the kernel's shape (of the slice).
      num_letters: letters of the alphabet (None when skipped).
      relative_error: ||XW - X~Q||_F / ||XW||_F on the calibration set.
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


def _calibration_batches(calibration: Calibration) -> Callable[[], Iterator[Any]]:
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
    """A calibration batch: numbers (floating inputs, or integer token ids), finite, non-empty."""
    batch = jnp.asarray(batch)
    if not (jnp.issubdtype(batch.dtype, jnp.floating) or jnp.issubdtype(batch.dtype, jnp.integer)):
        raise ValueError(
            f"calibration batches must be floating point inputs or integer token ids, got dtype "
            f"{batch.dtype}"
        )
    if batch.ndim < 1 or batch.shape[0] == 0:
        raise ValueError(f"calibration batch has shape {batch.shape}: no examples")
    if first_shape is not None and batch.shape[1:] != first_shape[1:]:
        raise ValueError(
            f"calibration batch of shape {batch.shape} differs from the first batch "
            f"{first_shape} beyond the batch axis"
        )
    if jnp.issubdtype(batch.dtype, jnp.floating) and not np.all(np.isfinite(np.asarray(batch))):
        raise ValueError("calibration batch contains NaN or Inf")
    return batch


def _adapter(model, args, apply_kwargs) -> tuple[Adapter, Calibration]:
    if isinstance(model, nnx.Module):
        if len(args) != 1:
            raise ValueError(
                "an NNX module is quantized as quantize_model(module, calibration, ...): "
                f"got {len(args)} positional arguments after the module"
            )
        return NNXAdapter(model, apply_kwargs), args[0]
    if isinstance(model, nn.Module):
        if len(args) != 2:
            raise ValueError(
                "a Linen module is quantized as quantize_model(model, variables, calibration, "
                f"...): got {len(args)} positional arguments after the model"
            )
        return LinenAdapter(model, args[0], apply_kwargs), args[1]
    raise ValueError(f"quantize_model takes a Flax Linen or NNX module, got {type(model).__name__}")


def _in_forward_order(found: Sequence[Layer]) -> list[tuple[Layer, tuple[int, ...]]]:
    """(layer, slice index) in the order the forward pass computes them.

    Consecutive stacked layers of one scan (same stack shape, same first path part) run slice
    after slice: all of slice 0's layers in call order, then slice 1's, ...
    """
    units, i = [], 0
    while i < len(found):
        group = [found[i]]
        root = found[i].path.split("/")[0]
        while (
            found[i].stack_shape
            and i + len(group) < len(found)
            and found[i + len(group)].stack_shape == found[i].stack_shape
            and found[i + len(group)].path.split("/")[0] == root
        ):
            group.append(found[i + len(group)])
        units += [(layer, index) for index in np.ndindex(*found[i].stack_shape) for layer in group]
        i += len(group)
    return units


@functools.partial(jax.jit, static_argnums=0)
def _rows(kind: LayerKind, x) -> jax.Array:
    return kind.rows(x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _add_rows(kind: LayerKind, stats: GramStats, x, x_tilde) -> GramStats:
    """Rows of one batch's X and X~ folded into the statistics, as one compiled program."""
    return accumulate(stats, kind.rows(x), kind.rows(x_tilde))


def quantize_model(
    model: nn.Module | nnx.Module,
    *args: Any,
    spec: LayerSpec = DEFAULT_SPEC,
    rules: RulesLike | None = None,
    layers: RulesLike | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[Any, list[LayerReport]]:
    """Quantizes every Dense, DenseGeneral, Einsum and Conv kernel of a Flax model, in call order.

    Linen: `quantize_model(model, variables, calibration, ...)` returns (new variables, reports).
    NNX: `quantize_model(module, calibration, ...)` returns (a new module, reports) and leaves
    `module` untouched.

    Layer l's method sees X (its input in the float model) and X~ (its input in the model whose
    earlier layers are quantized), accumulated over all calibration batches into `GramStats`.
    Embedding tables are left float (round them with `qjax.msq` if wanted); biases, normalization
    and every other variable stay as they were.

    Args:
      model: a Linen module (followed by its variables) or an NNX module.
      *args: Linen: (variables, calibration); NNX: (calibration,). The calibration inputs are
        what the model takes (preprocessed images, or integer token ids): one array (one batch),
        a list of batches, or a function returning a fresh iterator of batches (each layer reads
        all of them once).
      spec: the `LayerSpec` of every layer no rule matches.
      rules: ordered (pattern, LayerSpec) pairs (or a mapping); the first pattern that fully
        matches a layer's path (`re.fullmatch`, e.g. "blocks/attn/.*") gives its spec. Every
        pattern must match a layer. `LayerSpec(method="skip")` keeps a layer float.
      layers: the former name of `rules` (still accepted; give one of the two).
      apply_kwargs: keyword arguments of every forward pass (Linen `model.apply(..., **kw)`, e.g.
        {"train": False}; NNX `module(batch, **kw)`). NNX modules run in `eval()` mode.
      mesh: accumulate each layer's statistics data-parallel over this device mesh (and split
        GPFQ's neurons over it), see `qjax.stats`; the codes are those of the unsharded run.
        The forward passes run where the model and the batches are. On several hosts
        (`jax.distributed`), every process passes its own calibration batches, the same number
        of them, and gets the whole quantized model.
      progress: show a progress bar over layers.

    Returns:
      (quantized variables or module, one `LayerReport` per layer or slice in call order).

    Raises:
      ValueError: a pattern that matches no layer; a kernel-owning layer that is not skipped and
        qjax cannot quantize (unknown kind, never called, called twice); calibration batches that
        are not numbers, not finite, or not of the shape the model takes.
    """
    if rules is not None and layers is not None:
        raise ValueError("give rules= or its former name layers=, not both")
    adapter, calibration = _adapter(model, args, apply_kwargs)
    table = Rules(rules if rules is not None else layers, default=spec)
    batches = _calibration_batches(calibration)
    first = _checked(next(batches()), None)
    found = adapter.layers(first)
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer with a kernel to quantize")
    table.check_matches([layer.path for layer in found])
    for layer in found:
        if layer.problem is not None and not table.spec_for(layer.path).skip:
            raise ValueError(
                f"layer {layer.path} {layer.problem}: qjax quantizes Dense/Linear, "
                f"DenseGeneral/LinearGeneral, Einsum and Conv layers; keep it float with "
                f"rules=[({layer.path!r}, LayerSpec(method='skip'))]"
            )

    float_state = adapter.state
    current = float_state
    reports = []
    units = _in_forward_order(found)
    for layer, index in tqdm(units, desc="quantizing layers", disable=not progress):
        layer_spec = table.spec_for(layer.path)
        name = layer.path + (f"[{', '.join(map(str, index))}]" if index else "")
        kernel = adapter.kernel(current, layer)
        if layer_spec.skip:
            shape = tuple(kernel.shape[len(layer.stack_shape) :])
            reports.append(LayerReport(name, layer.type_name, "skip", shape, None, None, None, 0))
            continue
        start = time.perf_counter()
        method = layer_spec.quantizer
        kind = layer_spec.layer_kind(layer.kind)
        matrix = kind.to_matrix(kernel[index])
        stats = gram_stats_init(
            matrix.shape[-2],
            batch_shape=matrix.shape[:-2],
            track_error=True,
            dtype=jnp.result_type(matrix.dtype, jnp.float32),
            mesh=mesh,
        )
        for batch in batches():
            batch = _checked(batch, first.shape)
            x = adapter.inputs(float_state, layer, index, batch)
            x_tilde = adapter.inputs(current, layer, index, batch)
            if mesh is None:
                stats = _add_rows(kind, stats, x, x_tilde)
            else:  # this process's rows, split over the mesh's devices
                stats = gram_stats_update(stats, _rows(kind, x), _rows(kind, x_tilde))
        alphabet = layer_spec.make_alphabet(matrix)
        q = method.quantize(matrix, stats, alphabet)
        if mesh is not None:  # all of Q on this process, for the next forward passes
            q = jnp.asarray(multihost_utils.process_allgather(q, tiled=True))
        rounded = q if isinstance(method, MSQ) else MSQ().quantize(matrix, stats, alphabet)
        error = float(relative_error(matrix, q, stats))
        msq_error = float(relative_error(matrix, rounded, stats))
        new_kernel = kernel.at[index].set(kind.from_matrix(q).astype(kernel.dtype))
        current = adapter.with_kernel(current, layer, new_kernel)
        seconds = time.perf_counter() - start
        reports.append(
            LayerReport(
                name,
                kind.name,
                method.name,
                tuple(kernel.shape[len(layer.stack_shape) :]),
                alphabet.size,
                error,
                msq_error,
                seconds,
            )
        )
        logging.info(
            "%s %s: relative error %.4f (MSQ %.4f), %d letters, %.1fs",
            name,
            method.name,
            error,
            msq_error,
            alphabet.size,
            seconds,
        )
    return adapter.result(current), reports


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
