"""The import direction of the house: core <- data <- stages <- pipeline <- demo and the two scripts, with the
training plumbing (launch) used only by the stages' training modules; every shipped config loads."""
from __future__ import annotations

import ast
import glob
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("vqgan", "bart_prior", "clip_rank")
PROJECT = ("core", "data", *STAGES, "launch", "pipeline", "demo")
# what each package may import (besides itself; the prior and CLIP decode with a VQGAN while training); the
# stages' training.py may also import launch
ALLOWED = {"core": set(), "data": {"core"}, "vqgan": {"core", "data"}, "bart_prior": {"core", "data", "vqgan"},
           "clip_rank": {"core", "data", "vqgan"}, "launch": {"core", "data"},
           "pipeline": {"core", "data", *STAGES}, "demo": {"core", "data", *STAGES, "pipeline"}}
# the old entry points kept as aliases: `python -m launch.demo`, `python -m launch.evaluate`
ALIAS_SHIMS = {"launch/demo.py", "launch/evaluate.py"}


def _modules(package: str) -> list[str]:
    return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, package, "*.py")))


def _imported_packages(path: str) -> set[str]:
    """Top-level project packages a file imports anywhere (lazy imports inside functions included)."""
    tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT + ("train", "generate"))


@pytest.mark.parametrize("package", PROJECT)
def test_imports_flow_one_way(package):
    wrong = []
    for path in _modules(package):
        if path in ALIAS_SHIMS:
            continue
        allowed = ALLOWED[package] | {package}
        if package in STAGES and path.endswith("training.py"):
            allowed = allowed | {"launch"}
        wrong += [f"{path} imports {p}" for p in sorted(_imported_packages(path) - allowed)]
    assert not wrong


def test_nothing_imports_the_entry_scripts():
    paths = [p for pkg in PROJECT + ("bench",) for p in _modules(pkg)] + ["train.py", "generate.py"]
    assert not [p for p in paths if _imported_packages(p) & {"train", "generate"}]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(__import__('json').dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def test_stage_model_modules_load_no_plumbing_pipeline_or_demo():
    # one fresh interpreter importing all of them: what the union loads, each alone loads at most
    modules = [p[:-3].replace("/", ".") for s in STAGES for p in _modules(s) if not p.endswith(("training.py",
                                                                                              "__main__.py"))]
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    assert not loaded & {"launch", "pipeline", "demo", "pytorch_lightning"}, modules


def test_plumbing_loads_no_stage():
    modules = [p[:-3].replace("/", ".") for p in _modules("launch") if p not in ALIAS_SHIMS]
    assert not _loaded_after("; ".join(f"import {m}" for m in modules)) & {*STAGES, "pipeline", "demo"}


def test_no_two_public_classes_share_a_name():
    seen: dict[str, str] = {}
    clashes = []
    for package in PROJECT:
        for path in _modules(package):
            if path in ALIAS_SHIMS or path.endswith("__main__.py"):
                continue
            module = importlib.import_module(path[:-3].replace("/", "."))
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and not name.startswith("_") and obj.__module__ == module.__name__:
                    if name in seen and seen[name] != module.__name__:
                        clashes.append(f"{name}: {seen[name]} and {module.__name__}")
                    seen.setdefault(name, module.__name__)
    assert not clashes


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))),
                         ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")))
def test_every_shipped_config_loads_and_resolves(path):
    from core.configs import model_preset
    from launch.components import REGISTRY, get_component
    from launch.config import RunConfig, load_config

    stage = os.path.basename(os.path.dirname(path))
    schema = get_component(stage).schema if stage in REGISTRY else RunConfig
    cfg = load_config(schema, path)
    assert cfg.trainer.max_steps > 0
    if stage in REGISTRY and "model" in cfg:
        # the model section builds its model config; for the VQGAN and the prior it is also their named preset
        name = os.path.basename(path)[:-5]
        if stage == "vqgan":
            from vqgan import VQGANConfig, preset
            assert preset(name) == VQGANConfig.from_dict(dict(cfg.model))
        elif stage == "bart_prior":
            from bart_prior import preset
            assert preset(name).d_model == cfg.model.d_model and model_preset(stage, name)["grid"] == list(cfg.model.grid)


def test_old_entry_points_still_run():
    for module in ("launch.demo", "launch.evaluate", "demo", "demo.evaluate"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0 and "usage" in res.stdout, (module, res.stderr[-1000:])
    import launch
    from pipeline import Pipeline

    with pytest.warns(DeprecationWarning, match="from pipeline import Pipeline"):
        assert launch.Pipeline is Pipeline
