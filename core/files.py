"""Writing files and folders so that a crash never leaves a partial one, and reading model folders with one-line
errors.

Every writer of the project (shards, model folders, bundles, exports, reports) goes through :func:`atomic_file` or
:func:`atomic_folder`: the new content is written under a temporary name beside the destination, flushed to disk,
and only then put in place, so the destination always holds either the complete previous version or the complete
new one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from core.errors import ModelFolderError

if TYPE_CHECKING:  # torch is imported by the functions that need it: writers and readers of plain files do not
    import torch
    from torch import nn


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without error it is flushed and
    renamed over ``path`` (one step), otherwise removed and ``path`` is untouched."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, payload: Any) -> None:
    """``json.dump`` through :func:`atomic_file` (indented, UTF-8 kept readable)."""
    with atomic_file(path) as fh:
        json.dump(payload, fh, indent=2, ensure_ascii=False)


def _old_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def recover_folder(path: str) -> None:
    """Undo what a writer killed mid-swap left behind: a missing ``path`` with its previous version set aside is
    put back, and abandoned temporary folders beside ``path`` are removed."""
    path = os.path.abspath(path)
    old = _old_name(path)
    if os.path.isdir(old):
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    for stale in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield an empty temporary folder beside ``path`` to write into. When the block ends without error its files
    are flushed and it replaces ``path`` in one step (the two folders are exchanged, then the old one is removed);
    on error it is removed and ``path`` is untouched.

    Where the system cannot exchange two folders in one step, the previous folder is set aside as ``.NAME.old``
    for the instant between two renames; the next write (or :func:`recover_folder`) puts it back if a crash fell in
    between. One writer per destination at a time."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_folder(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        _fsync_tree(tmp)
        if not os.path.lexists(path):
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)
        else:
            old = _old_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading model folders


def require_files(folder: str, names: Sequence[str], kind: str, hint: str) -> None:
    """ModelFolderError unless ``folder`` is a folder holding every one of ``names``."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: no such folder; {hint}")
    for name in names:
        if not os.path.exists(os.path.join(folder, name)):
            raise ModelFolderError(f"{folder} is not a {kind} folder (no {name}); {hint}")


def read_json(path: str) -> dict:
    """A JSON object from ``path``; a missing file, bad JSON or another top-level type is a one-line error."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def load_safetensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or damaged file is a one-line error naming it."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: not found")
    try:
        return load_file(path, device=str(device))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError or ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFolderError(f"{path}: cannot read the weights ({detail}); the file is damaged or truncated, "
                               "write or download it again") from None


def check_safetensors(path: str) -> None:
    """A one-line error unless ``path`` is a complete safetensors file (reads its header only)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: not found")
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as exc:
        raise ModelFolderError(f"{path}: cannot read the weights ({str(exc).splitlines()[0]}); the file is damaged "
                               "or truncated, write or download it again") from None


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """ModelFolderError naming the first tensor of ``state`` that is missing, unexpected or mis-shaped for
    ``model``."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ModelFolderError(f"{source}: missing tensor '{key}' (the model expects shape {tuple(value.shape)})")
    for key, value in state.items():
        if key not in own:
            raise ModelFolderError(f"{source}: unexpected tensor '{key}' (shape {tuple(value.shape)})")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelFolderError(f"{source}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                                   f"{tuple(own[key].shape)}")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after :func:`check_state`."""
    check_state(model, state, source)
    model.load_state_dict(dict(state), strict=True)


def init_from(model: nn.Module, folder: str, weights_name: str, kind: str) -> None:
    """The ``init_from`` config key of every stage: load the weights file of a ``save_pretrained`` folder into
    ``model``, an already built model of the configured architecture; any difference is a one-line error naming the
    first mismatched tensor."""
    require_files(folder, (weights_name,), kind, f"init_from takes a {kind} save_pretrained folder "
                                                  "(a training run's export/)")
    path = os.path.join(folder, weights_name)
    load_state(model, load_safetensors(path), source=f"init_from {path}")


def save_png(image: torch.Tensor, path: str) -> None:
    """Write a uint8 (3, H, W) tensor as a PNG file through :func:`atomic_file`."""
    from PIL import Image

    with atomic_file(path, "wb") as fh:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(fh, format="PNG")
