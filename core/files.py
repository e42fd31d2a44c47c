"""Writing files and folders so that a crash never leaves a partial one, and reading model folders with one-line
errors.

Every writer of the project (shards, model folders, bundles, exports, reports, checkpoints) goes through
:func:`atomic_file` / :func:`atomic_path` or :func:`atomic_folder` (:func:`staging_folder` + :func:`commit_folder`
where several processes write one folder): the new content is written under a temporary name beside the
destination, flushed to disk, and only then put in place, so the destination always holds either the complete
previous version or the complete new one. A writer killed mid-write leaves only its temporary, which the next write
of the same destination removes. Logs that only grow (the CSV metrics log) append whole lines with
:func:`append_text`; a crash can tear their last line only, which :func:`read_complete_lines` leaves out.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
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


_TMP_FILE = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")


def remove_stale_temporaries(path: str) -> int:
    """Remove the temporary files that writers of ``path`` killed mid-write left beside it (``.NAME.XXXXXXXX.tmp``);
    returns how many. Only those of this one destination: one writer per destination at a time."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    removed = 0
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        m = _TMP_FILE.match(os.path.basename(stale))
        if m and m.group("name") == name:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.remove(stale)
                removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` for a writer that wants a name rather than a file object (PIL's
    ``save``, safetensors' ``save_file``, a YAML dumper); when the block ends without error the file is flushed and
    renamed over ``path`` (one step), otherwise removed and ``path`` is untouched. Temporary files a killed writer of
    ``path`` left are removed first."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have made, not mkstemp's private 0600
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without error it is flushed and
    renamed over ``path`` (one step), otherwise removed and ``path`` is untouched. Temporary files a killed writer of
    ``path`` left are removed first."""
    with atomic_path(path) as tmp:
        text = "b" not in mode
        with open(tmp, mode, encoding=encoding if text else None, newline=newline if text else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def append_text(path: str, text: str) -> None:
    """Append ``text`` (whole lines) to a log file in one write. The one writer here that does not replace its
    destination: a log only grows, and a crash can at worst leave its last line torn, which
    :func:`read_complete_lines` leaves out (the next complete write after it starts on a new line)."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # a torn last line (a crash mid-append): end it, so the new lines stay whole
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_complete_lines(path: str) -> str:
    """The text of a log written by :func:`append_text` without torn lines (a crash mid-append leaves its last line
    without its newline, or a torn line before the next write's newline: only a final one is detectable and left
    out here; the other is a line with too few fields for the reader of the format)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        text = fh.read()
    return text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]


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


def staging_folder(path: str) -> str:
    """A new empty temporary folder beside ``path`` (after :func:`recover_folder`), for :func:`commit_folder`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recover_folder(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    os.chmod(tmp, 0o777 & ~_umask())  # what os.makedirs would have made, not mkdtemp's private 0700
    return tmp


def commit_folder(tmp: str, path: str) -> None:
    """Flush the files of ``tmp`` (from :func:`staging_folder`) and put it in place of ``path`` in one step (the two
    are exchanged, then the old one is removed). For writers that cannot use :func:`atomic_folder` as one block,
    e.g. the ranks of a job writing one sharded checkpoint together (one of them commits)."""
    path = os.path.abspath(path)
    _fsync_tree(tmp)
    if not os.path.lexists(path):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
    else:
        old = _old_name(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(os.path.dirname(path))


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield an empty temporary folder beside ``path`` to write into. When the block ends without error its files
    are flushed and it replaces ``path`` in one step (the two folders are exchanged, then the old one is removed);
    on error it is removed and ``path`` is untouched.

    Where the system cannot exchange two folders in one step, the previous folder is set aside as ``.NAME.old``
    for the instant between two renames; the next write (or :func:`recover_folder`) puts it back if a crash fell in
    between. One writer per destination at a time."""
    tmp = staging_folder(path)
    try:
        yield tmp
        commit_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_update(path: str, replaced: Sequence[str]) -> Iterator[str]:
    """:func:`atomic_folder` for writers that own only some files of a shared folder (min-dalle's model folders):
    the temporary folder starts with hard links to everything in ``path`` except the names in ``replaced`` (copies
    where the file system has no hard links), so that the swap replaces those files together and keeps the rest."""
    with atomic_folder(path) as tmp:
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name in replaced:
                    continue
                src, dst = os.path.join(path, name), os.path.join(tmp, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(src, dst)
        yield tmp


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
