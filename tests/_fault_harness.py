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
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import torch  # noqa: E402

torch.set_num_threads(1)


# ---- the writers --------------------------------------------------------------------------------------------------


class Writer:
    """``prepare(work)`` once; ``payload(version)`` in this process (what the child writes: built before forking,
    so the child only writes); ``write(dest, payload)`` in the child; ``check(dest)``: the version the destination
    holds, None when absent, ``"partial"`` (or an exception) when it is neither."""

    dest_name = "dest"
    versioned = True  # False: every write writes the same content (resumable sets); check returns "complete" or n

    def prepare(self, work: str) -> None:
        self.work = work

    def payload(self, version: int) -> Any:
        return version

    def write(self, dest: str, payload: Any) -> None:
        raise NotImplementedError

    def check(self, dest: str) -> Any:
        raise NotImplementedError

    def disturb(self, dest: str, rng: random.Random, everything: bool = False) -> None:
        """Before a try: give a resumable writer work to do (versioned writers always write everything)."""

    def leftovers(self, dest: str) -> list[str]:
        """Temporaries of writes to ``dest`` (hidden names beside it starting with its own)."""
        folder, name = os.path.split(dest)
        return sorted(n for n in os.listdir(folder) if n.startswith(f".{name}."))


def _marker(module: torch.nn.Module, version: int) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(version)
            break
    return module


def _first(module: torch.nn.Module) -> int:
    return int(next(module.parameters()).flatten()[0].item())


def _tiny_vqgan_config(**overrides):
    from vqgan import preset

    return preset("tiny", **{**dict(resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
                                    mid_attention=False, z_channels=8, embed_dim=8, norm_groups=4, num_codes=64,
                                    codebook_dim=4), **overrides})


class VQGANFolder(Writer):
    def payload(self, version):
        from vqgan import VQGAN

        torch.manual_seed(0)
        return _marker(VQGAN(_tiny_vqgan_config()), version)

    def write(self, dest, model):
        model.save_pretrained(dest)

    def check(self, dest):
        from vqgan import VQGAN

        return _first(VQGAN.from_pretrained(dest)) if os.path.exists(dest) else None


class PriorFolder(Writer):
    def prepare(self, work):
        super().prepare(work)
        from _bart_prior_helpers import make_tokenizer

        self.tokenizer = make_tokenizer(os.path.join(work, "tokenizer"))

    def payload(self, version):
        return self._prior(version)

    arch = "bart"

    def _prior(self, version):
        from _bart_prior_helpers import tiny_prior

        prior = tiny_prior(self.tokenizer, codebook_size=64, grid=(8, 8), arch=self.arch)
        _marker(prior.model, version)
        return prior

    def write(self, dest, prior):
        prior.save_pretrained(dest)

    def check(self, dest):
        from bart_prior import BartPrior

        return _first(BartPrior.from_pretrained(dest).model) if os.path.exists(dest) else None


class ClipFolder(Writer):
    def payload(self, version):
        from _clip_helpers import TINY_ARCH
        from clip_rank import ClipRanker
        from clip_rank.io import build_clip

        torch.manual_seed(0)
        model = build_clip(arch=TINY_ARCH, pretrained="scratch")
        _marker(model.clip, version)
        return ClipRanker(model)

    def write(self, dest, ranker):
        ranker.save_pretrained(dest)

    def check(self, dest):
        from clip_rank import ClipRanker

        return _first(ClipRanker.from_pretrained(dest).model.clip) if os.path.exists(dest) else None


class Checkpoint(Writer):
    dest_name = "last.ckpt"

    def payload(self, version):
        return {"global_step": version, "state_dict": {"w": torch.full((256, 1024), float(version))}}

    def write(self, dest, checkpoint):
        from launch.trainer import AtomicCheckpointIO

        AtomicCheckpointIO().save_checkpoint(checkpoint, dest)

    def check(self, dest):
        if not os.path.exists(dest):
            return None
        ckpt = torch.load(dest, map_location="cpu", weights_only=True)
        assert torch.equal(ckpt["state_dict"]["w"], torch.full((256, 1024), float(ckpt["global_step"])))
        return ckpt["global_step"]


class Export(Writer):
    """train.py's end of run: launch.train.export of a trained VQGAN module (rank 0 writes save_pretrained)."""

    def prepare(self, work):
        super().prepare(work)
        from launch.train import resolve_config

        self.cfg = resolve_config("vqgan", os.path.join(REPO, "configs", "vqgan", "tiny.yaml"), check_files=False)

    def payload(self, version):
        from vqgan.training import VQGANModule

        torch.manual_seed(0)
        module = VQGANModule(self.cfg)
        _marker(module.vqgan, version)
        return module

    def write(self, dest, module):
        from types import SimpleNamespace

        from launch.train import export

        export(module, SimpleNamespace(strategy=SimpleNamespace(barrier=lambda *a: None), is_global_zero=True), dest)

    check = VQGANFolder.check


class Bundle(Writer):
    """pipeline.assemble_bundle: odd versions from one set of parts, even ones from another."""

    def prepare(self, work):
        super().prepare(work)
        from _bart_prior_helpers import make_tokenizer, tiny_prior
        from _clip_helpers import TINY_ARCH
        from clip_rank import ClipRanker
        from clip_rank.io import build_clip
        from vqgan import VQGAN

        tok = make_tokenizer(os.path.join(work, "tokenizer"))
        self.parts = {}
        for parity in (0, 1):
            root = os.path.join(work, f"parts{parity}")
            torch.manual_seed(parity)
            VQGAN(_tiny_vqgan_config()).save_pretrained(os.path.join(root, "vqgan"))
            tiny_prior(tok, codebook_size=64, grid=(8, 8), seed=parity).save_pretrained(os.path.join(root, "prior"))
            ClipRanker(build_clip(arch=TINY_ARCH, pretrained="scratch")).save_pretrained(os.path.join(root, "clip"))
            self.parts[parity] = root

    def payload(self, version):
        return version

    def write(self, dest, version):
        from pipeline.bundle import assemble_bundle

        root = self.parts[version % 2]
        assemble_bundle(os.path.join(root, "vqgan"), os.path.join(root, "prior"), os.path.join(root, "clip"), dest,
                        sampling={"condition_scale": float(version)})

    def check(self, dest):
        from core.files import read_json
        from pipeline.bundle import load_parts

        if not os.path.exists(dest):
            return None
        load_parts(dest)  # every part loads
        version = int(read_json(os.path.join(dest, "bart_prior", "config.json"))["condition_scale"])
        parts = read_json(os.path.join(dest, "bundle.json"))["parts"]
        assert parts["vqgan"].startswith(self.parts[version % 2]), parts
        return version


class ConvertedVQGAN(Writer):
    """python -m vqgan.convert --from min-dalle SRC --out DEST (a small detoker.pt per version)."""

    def payload(self, version):
        from vqgan import VQGAN

        torch.manual_seed(0)
        # the plain quantizer min-dalle's detokenizer has (no projection, no normalised codes)
        model = VQGAN(_tiny_vqgan_config(codebook_dim=None, l2_norm_codes=False, restart_dead=False))
        with torch.no_grad():
            model.quantize.embedding.weight.fill_(version)
        state = {("embedding.weight" if k == "quantize.embedding.weight" else k): v
                 for k, v in model.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
        src = os.path.join(self.work, f"src{version}.pt")
        torch.save(state, src)
        return src

    def write(self, dest, src):
        from vqgan.convert import main

        if main(["--from", "min-dalle", src, "--out", dest]) != 0:
            raise SystemExit(1)

    def check(self, dest):
        from vqgan import VQGAN

        if not os.path.exists(dest):
            return None
        return int(VQGAN.from_pretrained(dest).quantize.embedding.weight.flatten()[0].item())


class ConvertedPrior(PriorFolder):
    """python -m bart_prior.convert --from folder SRC --to dalle-mini DEST (a DALL·E Mini architecture)."""

    arch = "dallebart"

    def payload(self, version):
        prior = self._prior(version)
        src = os.path.join(self.work, f"src{version}")
        prior.save_pretrained(src)
        return src

    def write(self, dest, src):
        from bart_prior.convert import main

        if main(["--from", "folder", src, "--to", "dalle-mini", dest]) != 0:
            raise SystemExit(1)

    def check(self, dest):
        from bart_prior.convert import read_prior

        if not os.path.exists(dest):
            return None
        return _first(read_prior("dalle-mini", dest).model)


class PriorToMinDalle(PriorFolder):
    """python -m bart_prior.convert --from folder SRC --to min-dalle DEST --variant mini: four files (encoder,
    decoder, vocab, merges) into a folder that may hold other files, replaced together (core.files.atomic_update):
    ``check`` says "mixed" when the encoder and the decoder come from two versions."""

    arch = "dallebart"

    def _prior(self, version):
        from _bart_prior_helpers import tiny_prior

        prior = tiny_prior(self.tokenizer, codebook_size=16384, grid=(16, 16), arch="dallebart")
        with torch.no_grad():
            prior.model.encoder.embed_tokens.weight.fill_(version)
            prior.model.decoder.embed_tokens.weight.fill_(version)
        return prior

    def payload(self, version):
        src = os.path.join(self.work, f"src{version}")
        self._prior(version).save_pretrained(src)
        return src

    def write(self, dest, src):
        from bart_prior.convert import main

        if main(["--from", "folder", src, "--to", "min-dalle", dest, "--variant", "mini"]) != 0:
            raise SystemExit(1)

    def check(self, dest):
        from bart_prior.convert import read_prior

        if not os.path.exists(os.path.join(dest, "decoder_mini.pt")):
            return None
        model = read_prior("min-dalle", dest, "mini").model
        enc, dec = (int(m.embed_tokens.weight.flatten()[0].item()) for m in (model.encoder, model.decoder))
        return enc if enc == dec else f"mixed: encoder of version {enc}, decoder of version {dec}"


class NaiveFile(Writer):
    """Not a writer of the project: a JSON file written in place, in pieces. The harness must catch it."""

    dest_name = "naive.json"

    def write(self, dest, version):
        with open(dest, "w") as fh:
            for i in range(200):
                fh.write(json.dumps({"version": version, "i": i}) + ("," if i < 199 else ""))
                fh.flush()
                time.sleep(0.0002)

    def check(self, dest):
        if not os.path.exists(dest):
            return None
        items = json.loads("[" + open(dest).read() + "]")
        assert len(items) == 200
        return items[0]["version"]


class _SetWriter(Writer):
    """A resumable set of shards: each shard and the manifest, when present, must equal the reference written once
    without faults; ``check`` returns how many files are present."""

    versioned = False

    def prepare(self, work):
        super().prepare(work)
        ref = os.path.join(work, "reference")
        self.write(ref, None)
        self.reference = {rel: open(os.path.join(ref, rel), "rb").read() for rel in self._files(ref)}

    @staticmethod
    def _files(root: str) -> list[str]:
        out = []
        for folder, _, names in os.walk(root):
            for n in names:
                if not n.startswith("."):
                    out.append(os.path.relpath(os.path.join(folder, n), root))
        return sorted(out)

    def check(self, dest):
        if not os.path.exists(dest):
            return None
        files = self._files(dest)
        for rel in files:
            assert rel in self.reference, f"unexpected {rel}"
            assert open(os.path.join(dest, rel), "rb").read() == self.reference[rel], f"{rel} differs"
        return len(files)

    def disturb(self, dest, rng, everything=False):
        """Remove some shards (all of them with ``everything``), as if an earlier run had not written them."""
        for rel in self._files(dest):
            if rel.endswith(".tar") and (everything or rng.random() < 0.6):
                os.remove(os.path.join(dest, rel))

    def leftovers(self, dest):
        out = []
        for folder, _, names in os.walk(dest):
            out += [os.path.join(folder, n) for n in names if n.startswith(".") and n != ".prepare.json"]
        return sorted(out)


class Shards(_SetWriter):
    """python -m data prepare shapes: train/val shards and manifest.json."""

    def write(self, dest, _):
        from data.prepare import prepare_shapes

        prepare_shapes(dest, num_samples=120, resolution=16, seed=0, shard_size=10)


class CodeShards(_SetWriter):
    """python -m vqgan.encode: one code shard per image shard, and manifest.json."""

    def prepare(self, work):
        from data.prepare import prepare_shapes
        from vqgan import VQGAN

        prepare_shapes(os.path.join(work, "shapes"), num_samples=160, resolution=32, seed=0, shard_size=10)
        torch.manual_seed(0)
        VQGAN(_tiny_vqgan_config()).save_pretrained(os.path.join(work, "vqgan"))
        super().prepare(work)

    def write(self, dest, _):
        from vqgan.encode import encode

        encode(os.path.join(self.work, "vqgan"), os.path.join(self.work, "shapes", "train", "*.tar"), dest,
               batch_size=4, threads=1)


WRITERS: dict[str, Callable[[], Writer]] = {
    "shards": Shards, "code_shards": CodeShards, "vqgan_folder": VQGANFolder, "prior_folder": PriorFolder,
    "clip_folder": ClipFolder, "bundle": Bundle, "export": Export, "checkpoint": Checkpoint,
    "vqgan_convert": ConvertedVQGAN, "prior_convert": ConvertedPrior, "prior_to_min_dalle": PriorToMinDalle,
    "naive_file": NaiveFile,
}


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
