"""One checkpoint format for every stage.

A checkpoint is a plain dict of tensors and JSON-like values, so it loads with
`torch.load(weights_only=True)` — no pickled code runs from a file a user did not
make. It carries the model's full open_clip config (the model is rebuilt from it,
no registry needed), the tokenizer's context length, the training state
(optimizer, step, epoch, RNG states, safe-ratio state, ...) and the safeclip
version. Writes are atomic: a killed save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from .factory import build_model, create_model, image_size_of, make_tokenizer
from ..io.shards import atomic_write_bytes

FORMAT = "safeclip-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, not ours, or for another architecture."""


# ---- RNG states, as weights_only-loadable values -------------------------------------

def rng_state() -> dict:
    """Python, numpy and torch generator states (CUDA too, when present)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # per device, so a checkpoint from a machine with more GPUs still loads
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


# ---- save / load ---------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config round-trips as JSON-like data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: dict, *,
                    training_state: dict | None = None) -> None:
    """Atomically write model weights + config + training state to `path`."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "safeclip_version": __version__,
        "model_config": _plain(config),
        "context_length": int(config["text_cfg"].get("context_length", 77)),
        "image_size": image_size_of(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "training_state": training_state or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict, validated; CheckpointError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is a paragraph about weights_only; the cause is one of two things.
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, or contains pickled code "
                              f"that safeclip will not run)")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {reason[:160]})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a safeclip checkpoint; for open_clip weights (e.g. open_clip_train's "
                              f"epoch_N.pt) pass --model ARCH --pretrained {path}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer safeclip ({payload.get('safeclip_version')}); "
                              f"upgrade to read it")
    return payload


def same_architecture(a: dict, b: dict) -> bool:
    """Configs describe the same network (the display name does not matter)."""
    strip = lambda c: {k: v for k, v in _plain(c).items() if k != "name"}  # noqa: E731
    return strip(a) == strip(b)


def load_state(model: torch.nn.Module, payload: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Load a checkpoint's weights into an existing model, strictly."""
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit this architecture "
                              f"({first[1].strip() if len(first) > 1 else first[0] if first else exc})")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expect_config: dict | None = None
                    ) -> tuple[torch.nn.Module, Callable[..., torch.Tensor], int, dict, dict]:
    """(model, tokenizer, image_size, config, training_state) from a checkpoint.

    `expect_config`, when given, must describe the same architecture (e.g. a resumed
    run's --model); otherwise CheckpointError names both."""
    payload = read_checkpoint(path, map_location)
    config = payload["model_config"]
    if expect_config is not None and not same_architecture(config, expect_config):
        raise CheckpointError(f"{path}: checkpoint is a {config.get('name', 'different')} model, "
                              f"not {expect_config.get('name', 'the requested architecture')}")
    try:
        model = build_model(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model: {exc}")
    load_state(model, payload, path)
    model.to(map_location)
    return model, make_tokenizer(config), image_size_of(config), config, payload["training_state"]


# ---- any model a user has ----------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to score with, and where it came from (for manifests and tables)."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    config: dict
    path: str            # the weights file, absolute
    weights: str         # "safeclip" (a safeclip checkpoint) or "open_clip" (--model + --pretrained)

    def describe(self) -> dict:
        return {"checkpoint": self.path, "weights": self.weights, "model": self.config.get("name")}


def open_clip_train_model(pretrained: str | os.PathLike) -> str | None:
    """The --model an open_clip_train run used, from its `params.txt` (the run folder holds
    checkpoints/epoch_N.pt and params.txt); None when the file is not in such a folder."""
    params = Path(pretrained).resolve().parent.parent / "params.txt"
    if Path(pretrained).resolve().parent.name != "checkpoints" or not params.is_file():
        return None
    for line in params.read_text(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "model" and value.strip():
            return value.strip()
    return None


def load_model(checkpoint: str | os.PathLike | None = None, *, model: str | None = None,
               pretrained: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> LoadedModel:
    """The model to score with: a safeclip checkpoint (`checkpoint`), or an open_clip architecture
    (`model`: a name such as ViT-B-32, a shipped config or a config JSON) with local open_clip
    weights (`pretrained`: e.g. open_clip_train's epoch_N.pt, a dict with `state_dict`, keys
    possibly prefixed `module.`). Without `model`, an open_clip_train checkpoint's run folder
    names it (params.txt). Nothing is downloaded."""
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("give a safeclip checkpoint, or --model ARCH with --pretrained WEIGHTS (one of the two)")
    if checkpoint is not None:
        if model is not None:
            raise ValueError("--model is for --pretrained weights; a safeclip checkpoint carries its own model")
        net, tokenizer, image_size, config, _state = load_checkpoint(checkpoint, map_location)
        return LoadedModel(net, tokenizer, image_size, config, os.path.abspath(checkpoint), "safeclip")
    if not os.path.isfile(pretrained):
        raise CheckpointError(f"{pretrained}: weights file not found (weights are never downloaded)")
    if model is None:
        model = open_clip_train_model(pretrained)
        if model is None:
            raise ValueError(f"{pretrained}: which architecture are these weights for? pass --model "
                             f"(an open_clip name such as ViT-B-32, or a model config .json)")
    net, tokenizer, image_size, config = create_model(model, str(pretrained))
    net.to(map_location)
    return LoadedModel(net, tokenizer, image_size, config, os.path.abspath(pretrained), "open_clip")
