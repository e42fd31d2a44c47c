"""Flax's msgpack checkpoint format (``flax_model.msgpack``), read and written without JAX.

A file is a msgpack map of nested maps whose leaves are arrays, each a msgpack extension (code 1) holding a
msgpack array ``(shape, dtype name, C-order bytes)``; numpy scalars use code 3 the same way. Flax splits an array
larger than 2**30 bytes into a map ``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``, whose
flat chunks are concatenated back here. bfloat16 arrays (numpy has no such dtype) are returned as torch tensors.
"""
from __future__ import annotations

from typing import Any, Iterator, Union

import msgpack
import numpy as np

from core.errors import ModelFolderError
from core.files import atomic_file

_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"

Leaf = Union[np.ndarray, "torch.Tensor"]  # noqa: F821 (torch only for bfloat16 leaves)


def _array(payload: bytes) -> Leaf:
    shape, dtype, buffer = msgpack.unpackb(payload, raw=False)
    if dtype == "bfloat16":
        import torch

        raw = np.frombuffer(buffer, dtype=np.uint16).reshape(shape)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
    if code == _NDARRAY:
        return _array(payload)
    if code == _NPSCALAR:
        return _array(payload)[()]
    if code == _COMPLEX:
        real, imag = msgpack.unpackb(payload, raw=False)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code}")


def _unchunk(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if _CHUNKED in node:
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [np.asarray(node["chunks"][str(i)]) for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in node.items()}


def read_flax_msgpack(path: str) -> dict:
    """The nested parameter tree of a Flax msgpack file; an unreadable or truncated file is a one-line error."""
    try:
        with open(path, "rb") as fh:
            tree = msgpack.unpackb(fh.read(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: not found") from None
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise ModelFolderError(f"{path}: not a readable Flax msgpack file ({str(exc).splitlines()[0][:200]}); "
                               "it is damaged or truncated") from None
    if not isinstance(tree, dict):
        raise ModelFolderError(f"{path}: a Flax msgpack file holds a map of parameters, found {type(tree).__name__}")
    return _unchunk(tree)


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Leaf]]:
    """(slash-joined path, leaf) pairs of a nested tree, in file order."""
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, path)
        else:
            yield path, value


def unflatten(items: dict[str, Any]) -> dict:
    """Slash-joined paths -> the nested tree ``flatten`` came from."""
    tree: dict = {}
    for path, value in items.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.nbytes > 2 ** 30:
            raise ValueError("arrays over 1 GiB would need Flax's chunked form, which this writer does not produce")
        return msgpack.ExtType(_NDARRAY, msgpack.packb((obj.shape, obj.dtype.name, np.ascontiguousarray(obj).tobytes())))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_NPSCALAR, msgpack.packb(((), obj.dtype.name, obj.tobytes())))
    raise TypeError(f"cannot write {type(obj).__name__} to a Flax msgpack file")


def write_flax_msgpack(tree: dict, path: str) -> None:
    """Write a nested tree of numpy arrays as Flax's ``to_bytes`` does (atomically)."""
    data = msgpack.packb(tree, default=_default, strict_types=True)
    with atomic_file(path, "wb") as fh:
        fh.write(data)
