"""The user docs stay true to the tree: every relative link in README.md and docs/ resolves, every command they show
names a module, file or make target that exists, and the README stays a front door (at most 300 lines)."""
from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")
SCRIPT = re.compile(r"\bpython3? ([\w./-]+\.py)\b")
MAKE = re.compile(r"\bmake ([a-z][\w-]*)")


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", _text(os.path.join(REPO, "Makefile")), flags=re.M))


def test_docs_exist():
    assert os.path.isfile(DOCS[0]) and len(DOCS) > 1, "README.md and docs/*.md"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(_text(path)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        file = target.split("#", 1)[0]
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file))):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, REPO)}: links to nothing: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_commands_name_what_exists(path):
    text = _text(path)
    missing = [m for m in set(MODULE.findall(text)) if m.split(".")[0] not in ("pip", "venv", "torch")
               and importlib.util.find_spec(m) is None]
    missing += [f for f in set(SCRIPT.findall(text)) if not os.path.isfile(os.path.join(REPO, f))]
    missing += [f"make {t}" for t in set(MAKE.findall(text)) if t not in _targets()]
    assert not missing, f"{os.path.relpath(path, REPO)}: commands name what does not exist: {sorted(missing)}"


def test_readme_is_a_front_door():
    text = _text(DOCS[0])
    assert len(text.splitlines()) <= 300
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block, "the two set-up commands come first"


def test_no_lab_history_in_docs_code_or_configs():
    pattern = re.compile(r"\bsessions? \d+|\bruns? \d+\b(?! (?:steps|minutes|seconds|s\b|prompts))", re.I)
    found = []
    for root in ("README.md", "docs", "configs", "core", "data", "vqgan", "bart_prior", "clip_rank", "launch",
                 "pipeline", "demo", "bench", "train.py", "generate.py"):
        paths = [os.path.join(REPO, root)] if os.path.isfile(os.path.join(REPO, root)) else \
            glob.glob(os.path.join(REPO, root, "**", "*.*"), recursive=True)
        for p in paths:
            if p.endswith((".py", ".md", ".yaml")):
                for i, line in enumerate(_text(p).splitlines(), 1):
                    if pattern.search(line):
                        found.append(f"{os.path.relpath(p, REPO)}:{i}: {line.strip()[:80]}")
    assert not found, "history belongs in commit messages and issue notes:\n" + "\n".join(found)
