"""Reading and writing `safetensors` checkpoints, single file or sharded, without PyTorch.

A `.safetensors` file is an 8-byte little-endian header length n, n bytes of JSON (each tensor's
dtype, shape and byte range; an optional "__metadata__" of strings), then the tensors' raw bytes.
A sharded checkpoint adds `model.safetensors.index.json`, whose "weight_map" names the shard of
every tensor.

`CheckpointReader` memory-maps the files: a tensor is a read-only NumPy view of the file's
bytes (bfloat16 through `ml_dtypes`, which JAX ships), so reading a checkpoint tensor by tensor
copies each tensor once, into whatever it is converted to, and never holds the checkpoint in
memory beside the model (the mapped pages belong to the page cache and can be dropped). This is
why qjax reads the format itself (about thirty lines) rather than through the `safetensors`
package, whose NumPy reader cannot return bfloat16 and whose PyTorch reader needs PyTorch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointReader", "write_safetensors"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
    """The JSON header of a `.safetensors` file and the offset of its first data byte."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: {error}") from error
    return header, 8 + length


class CheckpointReader:
    """The tensors of a checkpoint directory (or one `.safetensors` file), memory-mapped.

    Args:
      path: a directory holding `model.safetensors` or a sharded checkpoint
        (`model.safetensors.index.json` and its shards), or the path of one `.safetensors` file.

    Raises:
      FileNotFoundError: no safetensors checkpoint at `path`.
      ValueError: a malformed file, an unknown dtype, or a tensor named twice.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_FILE)
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
            elif os.path.exists(os.path.join(path, SINGLE_FILE)):
                files = [os.path.join(path, SINGLE_FILE)]
            else:
                raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        elif os.path.exists(path):
            files = [path]
        else:
            raise FileNotFoundError(f"no safetensors checkpoint at {path}")
        self._entries: dict[str, tuple[np.memmap, np.dtype, tuple[int, ...], int, int]] = {}
        for file in files:
            header, start = _read_header(file)
            data = np.memmap(file, dtype=np.uint8, mode="r")
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in more than one shard")
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"tensor {name!r} in {file} has dtype {entry['dtype']}; qjax reads "
                        f"{', '.join(_DTYPES)}"
                    )
                dtype = _DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
                if end - begin != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(f"tensor {name!r} in {file}: byte range does not fit {shape}")
                self._entries[name] = (data, dtype, shape, start + begin, start + end)

    @property
    def names(self) -> list[str]:
        """The tensor names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor `name`: a read-only view of the mapped file (no copy)."""
        if name not in self._entries:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        data, dtype, shape, begin, end = self._entries[name]
        return data[begin:end].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` (NumPy arrays; bfloat16 through `ml_dtypes`) to one `.safetensors` file.

    Args:
      path: the file to write.
      tensors: name → array, written in name order.
      metadata: optional string → string pairs stored as the header's "__metadata__"
        (Hugging Face checkpoints carry {"format": "pt"}).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors lacks")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays[name] = array
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.tobytes())
