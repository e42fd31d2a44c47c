"""The writers tests/_fault_harness.py injects faults into: each prepares what it writes (``payload``), writes one
version of its destination (``write``, the project's own code path) and reads back which version a destination holds
(``check``: the version, None for none, or a string naming what is wrong)."""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


class Report(Writer):
    """demo.evaluate.save_report, the demo's report: report.json, report_details.json, report.md and grid.png,
    replaced as one set (``check`` says "mixed" when the files come from two versions)."""

    dest_name = "report"

    def payload(self, version):
        report = {"version": version}
        details = {"version": version, "rows": [{"prompt": f"p{i}", "clip_scores": [0.5] * 16} for i in range(2000)]}
        grid = torch.full((3, 512, 512), version % 256, dtype=torch.uint8)
        return report, details, grid, f"# report {version}\n" + "row\n" * 20000

    def write(self, dest, payload):
        from demo.evaluate import save_report

        report, details, grid, markdown = payload
        save_report(os.path.dirname(dest), report, markdown, details, grid)

    def check(self, dest):
        import numpy as np
        from PIL import Image

        if not os.path.exists(dest):
            return None
        with open(os.path.join(dest, "report.json"), encoding="utf-8") as fh:
            version = json.load(fh)["version"]
        with open(os.path.join(dest, "report_details.json"), encoding="utf-8") as fh:
            details = json.load(fh)
        with open(os.path.join(dest, "report.md"), encoding="utf-8") as fh:
            markdown = fh.read()
        pixels = np.asarray(Image.open(os.path.join(dest, "grid.png")))
        assert markdown.count("row\n") == 20000 and len(details["rows"]) == 2000 and pixels.shape == (512, 512, 3)
        others = (details["version"], int(markdown.split()[2]), int(pixels[0, 0, 0]))
        if others != (version, version, version % 256):
            return f"mixed: report.json {version}, details/markdown/grid {others}"
        return version


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
    "report": Report,
    "naive_file": NaiveFile,
}
