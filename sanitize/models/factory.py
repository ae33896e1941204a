"""CLIP models from open_clip: any open_clip architecture by name, a config JSON
path, or one of the small configs shipped in `sanitize/models/configs/` for CPU work.

Towers, tokeniser and preprocessing constants are open_clip's; we only resolve
the config ourselves so a checkpoint can carry the exact config it was built
from and be rebuilt without any registry (see `sanitize.checkpoint`).
Weights are never downloaded: `pretrained` must be a local open_clip checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "safeclip-tiny-vit"
CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_models() -> list[str]:
    """Names of the small configs that ship with safeclip."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config(name_or_path: str) -> tuple[str, dict]:
    """(name, config dict) for a shipped name, an open_clip name, or a JSON file path."""
    import open_clip

    if name_or_path.endswith(".json") or os.sep in name_or_path or os.path.isfile(name_or_path):
        path = Path(name_or_path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{name_or_path}: model config file not found")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{name_or_path}: not a readable model config JSON ({exc})")
        name = path.stem
    elif (CONFIG_DIR / f"{name_or_path}.json").is_file():
        name, config = name_or_path, json.loads((CONFIG_DIR / f"{name_or_path}.json").read_text())
    else:
        config = open_clip.get_model_config(name_or_path)
        if config is None:
            raise ValueError(
                f"unknown model {name_or_path!r}; use a shipped model ({', '.join(shipped_models())}), "
                f"an open_clip architecture (e.g. RN50, ViT-B-32; see open_clip.list_models()) "
                f"or a model config .json path")
        name = name_or_path
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise ValueError(f"{name_or_path}: a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    return name, copy.deepcopy(config)


def build_model(config: dict) -> torch.nn.Module:
    """Instantiate an open_clip model from a config dict (random init), choosing the
    class the way open_clip's factory does."""
    import open_clip

    config = copy.deepcopy(config)
    config.pop("name", None)
    if "multimodal_cfg" in config:
        raise ValueError("CoCa models are not supported: safeclip trains contrastive CLIP models")
    custom_text = config.pop("custom_text", False) or "hf_model_name" in config["text_cfg"]
    if "hf_model_name" in config["text_cfg"]:
        config["text_cfg"]["hf_model_pretrained"] = False  # never download tower weights
    if "timm_model_name" in config["vision_cfg"]:
        config["vision_cfg"]["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**config)
    except (TypeError, KeyError, AssertionError) as exc:
        raise ValueError(f"invalid model config: {exc}")


def image_size_of(config: dict) -> int:
    size = config["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square image size {size} is not supported")
        size = size[0]
    return int(size)


def make_tokenizer(config: dict) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for this config, truncating to its context length."""
    import open_clip

    text_cfg = config["text_cfg"]
    context_length = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                                     **(text_cfg.get("tokenizer_kwargs") or {}))
    return open_clip.SimpleTokenizer(context_length=context_length)


def create_model(name_or_path: str = DEFAULT_MODEL, pretrained: str | None = None
                 ) -> tuple[torch.nn.Module, Callable[..., torch.Tensor], int, dict]:
    """(model, tokenizer, image_size, config). `config` is the full open_clip config
    plus `"name"`, enough to rebuild the model with `build_model`."""
    name, config = resolve_config(name_or_path)
    model = build_model(config)
    if pretrained:
        import open_clip

        if not os.path.isfile(pretrained):
            raise ValueError(f"{pretrained}: pretrained checkpoint not found (weights are never downloaded)")
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
        except Exception as exc:  # open_clip raises RuntimeError/KeyError/pickle errors alike
            raise ValueError(f"{pretrained}: cannot load into {name}: {str(exc).splitlines()[0]}")
    config = dict(config, name=name)
    return model, make_tokenizer(config), image_size_of(config), config


def model_config(config: dict) -> dict:
    """The part of our config open_clip's constructors accept (drops `name`)."""
    return {k: v for k, v in config.items() if k != "name"}


def encode_pairs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings, the space every SafeCLIP stage scores in."""
    image_emb = F.normalize(model.encode_image(images), dim=-1)
    text_emb = F.normalize(model.encode_text(tokens), dim=-1)
    return image_emb, text_emb


def describe(config: dict) -> dict[str, Any]:
    """A short summary for stats files and logs."""
    return {"name": config.get("name"), "embed_dim": config.get("embed_dim"),
            "image_size": image_size_of(config),
            "context_length": config["text_cfg"].get("context_length", 77)}
