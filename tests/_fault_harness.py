"""Fault injection into one writer of the project, for tests/test_fault_injection.py.

    python tests/_fault_harness.py WRITER WORK SEED KILLS SIZES

prepares what WRITER writes (models, sources) once, then, for each try, forks a child that writes a new version of
the destination while this process

* ``kill``: sends it SIGKILL at a random moment of the write (KILLS times, seeded by SEED; the delay is drawn up to
  1.3 times a measured full write, so some writes finish first);
* ``enospc``: lets it write N bytes through Python's file objects and ``os.write``, then raises
  ``OSError(ENOSPC)`` (for each N of SIZES, a comma-separated list of fractions of a full write's bytes);
* ``fsize``: lets it write N bytes into any one file, whatever writes them (Rust writers such as safetensors and
  tokenizers included): ``RLIMIT_FSIZE``, beyond which the system refuses the write with EFBIG (same Ns).

After each try it reads the destination (``check``): it must hold the complete previous version or the complete new
one (the new one only when the write finished), and a failed write must leave no temporary behind. At the end one
more write runs without faults: it must complete by itself and leave nothing but the destination. Prints one JSON
object: the versions seen and the problems found.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import random
import resource
import shutil
import signal
import sys
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import torch  # noqa: E402

torch.set_num_threads(1)


from _fault_writers import WRITERS, Writer  # noqa: E402


# ---- faults -------------------------------------------------------------------------------------------------------


class _Budget:
    left = 0

    @classmethod
    def spend(cls, n: int) -> None:
        if n > cls.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        cls.left -= n


class _FullDiskFile:
    """A writable file object whose writes fail with ENOSPC once the budget is spent."""

    def __init__(self, fh: Any) -> None:
        object.__setattr__(self, "_fh", fh)

    def write(self, data: Any) -> int:
        _Budget.spend(len(data.encode("utf-8") if isinstance(data, str) else memoryview(data).nbytes))
        return self._fh.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._fh, name, value)

    def __iter__(self):
        return iter(self._fh)

    def __enter__(self) -> "_FullDiskFile":
        self._fh.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._fh.__exit__(*exc)


def _full_disk_after(n: int) -> None:
    """In this (child) process: Python-level writes (open(), os.fdopen(), os.write) fail with ENOSPC after n bytes."""
    _Budget.left = n
    real_open, real_fdopen, real_write = builtins.open, os.fdopen, os.write

    def wrap(fh: Any, mode: str) -> Any:
        return _FullDiskFile(fh) if any(c in mode for c in "wax+") else fh

    def open_(file, mode="r", *args, **kwargs):
        return wrap(real_open(file, mode, *args, **kwargs), mode)

    def fdopen(fd, mode="r", *args, **kwargs):
        return wrap(real_fdopen(fd, mode, *args, **kwargs), mode)

    def write(fd, data):
        if fd > 2:
            _Budget.spend(len(data))
        return real_write(fd, data)

    builtins.open, os.fdopen, os.write = open_, fdopen, write
    import io

    io.open = open_


def _child(writer: Writer, dest: str, payload: Any, fault: Optional[tuple[str, int]]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    code = 0
    try:
        if fault is not None:
            kind, n = fault
            if kind == "fsize":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
            else:
                _full_disk_after(n)
        writer.write(dest, payload)
    except BaseException:  # noqa: BLE001 - a failed write is what is tested
        code = 3
    os._exit(code)


def _run(writer: Writer, dest: str, payload: Any, fault=None, kill_after: Optional[float] = None) -> str:
    """'done' | 'failed' | 'killed'."""
    _BEFORE[0] = set(writer.leftovers(dest)) if os.path.isdir(os.path.dirname(dest)) else set()
    pid = os.fork()
    if pid == 0:
        _child(writer, dest, payload, fault)
    if kill_after is not None:
        deadline = time.time() + kill_after
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return "done" if os.waitstatus_to_exitcode(status) == 0 else "failed"
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "done" if code == 0 else "killed" if code == -signal.SIGKILL else "failed"


_BEFORE: list[set] = [set()]


def _sizes(path: str) -> list[int]:
    if os.path.isfile(path):
        return [os.path.getsize(path)]
    return [os.path.getsize(os.path.join(f, n)) for f, _, names in os.walk(path) for n in names] or [0]


def main() -> None:
    name, work, seed, kills, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    fractions = [float(x) for x in sizes.split(",") if x]
    writer = WRITERS[name]()
    os.makedirs(work, exist_ok=True)
    writer.prepare(work)
    dest = os.path.join(work, "out", writer.dest_name)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    rng = random.Random(seed)
    problems: list[str] = []
    seen: list[Any] = []
    before_try = _BEFORE

    def settle(what: str, before: Any, version: int, outcome: str) -> Any:
        from core.files import recover_folder

        if not os.path.exists(dest) and any(n.endswith(".old") for n in writer.leftovers(dest)):
            recover_folder(dest)  # killed between the two renames of a system without an exchange: put back
        try:
            found = writer.check(dest)
        except Exception as exc:  # noqa: BLE001 - a destination that does not load
            found = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''})"
        seen.append(found)
        if writer.versioned:
            allowed = {version} if outcome == "done" else {before} if outcome == "failed" else {before, version}
            if found not in allowed:
                problems.append(f"{what}: found {found!r}, expected one of {sorted(allowed, key=str)} ({outcome})")
        elif isinstance(found, str):
            problems.append(f"{what}: {found}")
        left = sorted(set(writer.leftovers(dest)) - before_try[0])
        if outcome == "failed" and left:
            problems.append(f"{what}: a failed write left {left}")
        return found if (found is not None or not writer.versioned) else before

    # the first write here, unfaulted: it imports what writing needs, so the children only write
    writer.write(dest, writer.payload(1))
    current = settle("first write", None, 1, "done")
    version = 2
    writer.disturb(dest, rng, everything=True)
    started = time.time()
    outcome = _run(writer, dest, writer.payload(version))
    full_time = time.time() - started
    current = settle("second write", current, version, outcome)
    sizes = _sizes(dest)
    budget = {"enospc": max(1, sum(sizes)), "fsize": max(1, max(sizes))}
    for i in range(kills):
        version += 1
        payload = writer.payload(version)
        writer.disturb(dest, rng)
        outcome = _run(writer, dest, payload, kill_after=rng.uniform(0.0, 1.3 * full_time))
        current = settle(f"kill {i}", current, version, outcome)
    for kind in ("enospc", "fsize"):
        for fraction in fractions:
            version += 1
            n = int(budget[kind] * fraction)
            writer.disturb(dest, rng)
            outcome = _run(writer, dest, writer.payload(version), fault=(kind, n))
            current = settle(f"{kind} after {n} bytes", current, version, outcome)
    version += 1
    writer.disturb(dest, rng)
    outcome = _run(writer, dest, writer.payload(version))
    final = settle("final write", current, version, outcome)
    if outcome != "done":
        problems.append(f"the final write did not complete by itself: {outcome}")
    if not writer.versioned and final != len(writer.reference):
        problems.append(f"final write: {final} of {len(writer.reference)} files")
    if writer.leftovers(dest):
        problems.append(f"leftovers after the final write: {writer.leftovers(dest)}")
    print(json.dumps({"writer": name, "full_seconds": round(full_time, 3), "bytes": sum(sizes), "seen": seen,
                      "problems": problems}))
    shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)


if __name__ == "__main__":
    main()
