"""Building CLIP models from open_clip names, custom architectures or local checkpoints; exporting to open_clip.

Nothing here downloads: open_clip pretrained tags and ``hf-hub:`` names are refused with a message saying how to
give a local file instead. The export format is open_clip's own ``local-dir:`` folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so ``open_clip.create_model_and_transforms(
'local-dir:DIR')`` loads what we train, and anything open_clip saved can be fine-tuned here.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import open_clip
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from clip_rank.model import ClipModel
from core.errors import ConfigError, ModelFolderError
from core.files import atomic_folder, check_safetensors, check_state, load_safetensors, read_json, require_files

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
SCRATCH = ("scratch", "none", "null", "")
LOCAL_DIR = "local-dir:"


class PretrainedNotFoundError(ConfigError, FileNotFoundError):
    """A configured checkpoint file or folder does not exist (or is not an open_clip folder)."""


def _missing(what: str, path: str) -> PretrainedNotFoundError:
    return PretrainedNotFoundError(
        f"{what}: nothing at '{os.path.abspath(path)}' (looked for a checkpoint file (.safetensors/.pt/.bin) or a "
        f"folder with {CONFIG_NAME} + {WEIGHTS_NAME}); give a local path, or 'scratch' to start from random "
        f"weights. open_clip tags such as 'openai' are downloads, which this project never makes")


def resolve_pretrained(pretrained: Optional[str], what: str = "model.pretrained") -> tuple[str, Optional[str]]:
    """-> ("scratch", None) | ("dir", folder) | ("file", path); a missing path raises PretrainedNotFoundError."""
    if pretrained is None or str(pretrained).strip().lower() in SCRATCH:
        return "scratch", None
    path = str(pretrained)
    if path.startswith("hf-hub:"):
        raise ConfigError(f"{what}: '{path}' is a Hugging Face hub download; download it elsewhere and give "
                          "the local folder")
    if path.startswith(LOCAL_DIR):
        path = path[len(LOCAL_DIR):]
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise PretrainedNotFoundError(f"{what}: folder '{os.path.abspath(path)}' has no {CONFIG_NAME}; an "
                                          f"open_clip folder holds {CONFIG_NAME} + {WEIGHTS_NAME}")
        return "dir", path
    if os.path.isfile(path):
        return "file", path
    raise _missing(what, path)


def _check_offline(model_cfg: dict, source: str, from_folder: bool) -> None:
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise ConfigError(f"{source}: its text tower is the Hugging Face model '{text_cfg['hf_model_name']}', "
                          "which open_clip builds from the hub; this project only builds offline architectures")
    if text_cfg.get("hf_tokenizer_name") and not from_folder:
        raise ConfigError(f"{source}: its tokenizer '{text_cfg['hf_tokenizer_name']}' comes from the Hugging Face "
                          "hub; load it from a local open_clip folder that contains the tokenizer files")
    if model_cfg.get("vision_cfg", {}).get("timm_model_name"):
        try:
            import timm  # noqa: F401
        except ImportError:
            raise ConfigError(f"{source}: its image tower is a timm model and timm is not installed") from None


def _apply_overrides(model_cfg: dict, image_size: Optional[int], context_length: Optional[int]) -> dict:
    model_cfg = copy.deepcopy(model_cfg)
    if image_size:
        model_cfg["vision_cfg"]["image_size"] = int(image_size)
    if context_length:
        model_cfg["text_cfg"]["context_length"] = int(context_length)
    return model_cfg


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (open_clip's dataclasses reject DictConfig)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return copy.deepcopy(value)


class _QuietScratch(logging.Filter):
    """Hide open_clip's 'no weights loaded' warnings when random weights are what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("no CLIP weights found" in msg or "Model initialized randomly" in msg)


def build_clip(name: Optional[str] = None, arch: Optional[dict] = None, pretrained: Optional[str] = "scratch",
               image_size: Optional[int] = None, context_length: Optional[int] = None,
               image_mean: Optional[list] = None, image_std: Optional[list] = None) -> ClipModel:
    """Build a CLIP model with open_clip's factory.

    name: an open_clip architecture (``open_clip.list_models()``, e.g. "ViT-B-32").
    arch: a custom architecture dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional ``quick_gelu``...).
    pretrained: "scratch"/None, a checkpoint file for the architecture, or an open_clip folder (plain path or
        ``local-dir:PATH``; then the folder's ``open_clip_config.json`` sets the architecture and name/arch are
        ignored).
    image_size, context_length: override the architecture's input size / text length (open_clip resizes the
        position embeddings of a loaded checkpoint to fit).
    image_mean, image_std: override the normalisation the model expects.
    """
    kind, path = resolve_pretrained(pretrained)
    force_pp = {k: list(v) for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
    kwargs = dict(force_image_size=image_size or None, force_context_length=context_length or None,
                  force_preprocess_cfg=force_pp or None, pretrained_text=False, pretrained_image=False)
    with tempfile.TemporaryDirectory(prefix="clip_arch_") as tmp:
        if kind == "dir":
            source = f"{LOCAL_DIR}{path}"
            base_cfg = read_json(os.path.join(path, CONFIG_NAME)).get("model_cfg")
            if not base_cfg:
                raise ConfigError(f"{os.path.join(path, CONFIG_NAME)}: no 'model_cfg' section")
        elif arch:
            if name:
                raise ConfigError("model.name and model.arch are both set; give one architecture")
            base_cfg = _plain(arch)
            # open_clip builds custom architectures from a local-dir config; weights are loaded afterwards.
            with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
                json.dump({"model_cfg": base_cfg}, fh)
            source = f"{LOCAL_DIR}{tmp}"
        elif name:
            if name.startswith(("hf-hub:", LOCAL_DIR)):
                raise ConfigError(f"model.name '{name}': give folders as model.pretrained (local path), never hub "
                                  "names")
            base_cfg = open_clip.get_model_config(name)
            if base_cfg is None:
                raise ConfigError(f"model.name '{name}' is not an open_clip architecture "
                                  f"(see open_clip.list_models(), {len(open_clip.list_models())} known)")
            source = name
        else:
            raise ConfigError("model.name (an open_clip architecture) or model.arch (a custom one) is required")
        if not all(k in base_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"{source}: an architecture needs embed_dim, vision_cfg and text_cfg")
        _check_offline(base_cfg, source, from_folder=kind == "dir")
        quiet = _QuietScratch()
        if kind != "dir":
            logging.getLogger().addFilter(quiet)
        clip = None
        try:
            # weights_only: a .bin/.pt/.pth checkpoint is read without unpickling code objects, whoever wrote it
            clip = open_clip.create_model(source, weights_only=True, **kwargs)
            if kind == "file":
                open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
            tokenizer = open_clip.get_tokenizer(source, context_length=context_length or None)
        except Exception as exc:  # open_clip, torch.load, safetensors and pickle raise many types for bad files
            _explain_weights(kind, path, clip, kwargs, tmp)
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            label = path if kind == "dir" else (name or "custom architecture")
            where = f" with weights from '{path}'" if kind == "file" else ""
            raise ConfigError(f"cannot build CLIP '{label}'{where}: {detail}") from None
        finally:
            logging.getLogger().removeFilter(quiet)
    model_cfg = _apply_overrides(base_cfg, image_size, context_length)
    preprocess_cfg = copy.deepcopy(clip.visual.preprocess_cfg)
    return ClipModel(clip, tokenizer, model_cfg, preprocess_cfg)


def _explain_weights(kind: str, path: Optional[str], clip: Any, kwargs: dict, tmp: str) -> None:
    """After open_clip failed to load weights: ModelFolderError naming the first tensor of the weights file that is
    missing, unexpected or mis-shaped for the configured architecture (e.g. an open_clip_config.json that contradicts
    its safetensors), when that is the cause; returns quietly otherwise."""
    try:
        if kind == "dir":
            weights = os.path.join(path, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                return
            bare = os.path.join(tmp, "config_only")  # the folder's architecture without its weights
            os.makedirs(bare, exist_ok=True)
            shutil.copy(os.path.join(path, CONFIG_NAME), os.path.join(bare, CONFIG_NAME))
            quiet = _QuietScratch()
            logging.getLogger().addFilter(quiet)
            try:
                clip = open_clip.create_model(f"{LOCAL_DIR}{bare}", weights_only=True, **kwargs)
            finally:
                logging.getLogger().removeFilter(quiet)
        elif kind == "file" and clip is not None:
            weights = path
        else:
            return
        if weights.endswith(".safetensors"):
            state = load_safetensors(weights)
        else:
            import torch

            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            return
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    except ModelFolderError:
        raise
    except Exception:  # the weights cannot even be read: the caller's message says why
        return
    check_state(clip, state, source=weights)


def load_clip(folder: str) -> ClipModel:
    """An exported (or any open_clip ``local-dir``) folder -> ClipModel in eval mode."""
    kind, path = resolve_pretrained(folder, what="CLIP folder")
    if kind != "dir":
        raise PretrainedNotFoundError(f"CLIP folder: '{os.path.abspath(str(folder))}' is not a folder with "
                                      f"{CONFIG_NAME} + {WEIGHTS_NAME}")
    require_files(path, (CONFIG_NAME, WEIGHTS_NAME), "CLIP", "pass a folder written by ClipRanker.save_pretrained "
                  "or open_clip (a training run's export/)")
    read_json(os.path.join(path, CONFIG_NAME))
    check_safetensors(os.path.join(path, WEIGHTS_NAME))
    return build_clip(pretrained=path).eval()


def save_clip(model: ClipModel, path: str) -> str:
    """Write ``path`` as an open_clip local-dir folder (atomically: a previous folder stays whole until this one is
    complete)."""
    with atomic_folder(path) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.clip.state_dict().items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))
        save_config_for_hf(model.clip, Path(tmp) / CONFIG_NAME, model_config=model.model_cfg)
    return os.path.abspath(path)
