"""Backdoor triggers: BadNet patch, Blended, WaNet.

Each trigger is a pure function of an image (PIL or uint8 array) and a small
JSON-serialisable spec, so the poison manifest records exactly which trigger was
used and evaluation triggers test images the same way:

    trigger = trigger_from_spec(json.loads(manifest_row["trigger"]))
    triggered = trigger(image)          # PIL in -> PIL out, array in -> array out

Everything random (a patch or blend pattern, a warping field) is drawn from the
spec's `seed` and the image size only, never from global state. Sizes and
positions are given for 28-px images (Fashion-MNIST) and scaled with the
image's shorter side, so one spec works at any resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REFERENCE_SIZE = 28  # patch sizes/positions are in pixels of a 28-px image
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PATTERNS = ("checkerboard", "white", "random")
TRIGGER_TYPES = ("badnet", "blended", "wanet")


# ---- array helpers -------------------------------------------------------------------

def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 HxW (grayscale) or HxWx3 array; other PIL modes become RGB."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 HxW or HxWxC array, got {array.dtype} {array.shape}")
    return array.copy()


def _scale(value: float, array: np.ndarray) -> int:
    return int(round(value * min(array.shape[:2]) / REFERENCE_SIZE))


def _broadcast(pattern: np.ndarray, array: np.ndarray) -> np.ndarray:
    """A 2-D pattern applied to every channel of a colour image."""
    if array.ndim == 3 and pattern.ndim == 2:
        return np.repeat(pattern[:, :, None], array.shape[2], axis=2)
    return pattern


# ---- BadNet patch ----------------------------------------------------------------------

def patch_pattern(name: str, size: int, seed: int = 0) -> np.ndarray:
    """A size x size uint8 patch: checkerboard (white top-left), white, or seeded noise."""
    if name == "checkerboard":
        rows, cols = np.indices((size, size))
        return np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
    if name == "white":
        return np.full((size, size), 255, dtype=np.uint8)
    if name == "random":
        return np.random.default_rng([seed, size]).integers(0, 256, (size, size), dtype=np.uint8)
    raise ValueError(f"unknown patch pattern {name!r}; choose one of {', '.join(PATTERNS)}")


def patch_box(spec: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a BadNet patch on an image of this size."""
    probe = np.zeros((height, width), dtype=np.uint8)
    size = max(1, _scale(spec["size"], probe))
    margin = _scale(spec.get("margin", 0), probe)
    position = spec["position"]
    if size > min(height, width):
        raise ValueError(f"patch of {size} px does not fit a {width}x{height} image")
    if isinstance(position, str):
        if position not in CORNERS:
            raise ValueError(f"unknown position {position!r}; choose one of {', '.join(CORNERS)} or X,Y")
        if position == "center":
            top, left = (height - size) // 2, (width - size) // 2
        else:
            top = margin if position.startswith("top") else height - size - margin
            left = margin if position.endswith("left") else width - size - margin
    else:
        left, top = _scale(position[0], probe), _scale(position[1], probe)
    top, left = min(max(top, 0), height - size), min(max(left, 0), width - size)
    return top, left, top + size, left + size


def paste_patch(array: np.ndarray, spec: dict) -> np.ndarray:
    top, left, bottom, right = patch_box(spec, *array.shape[:2])
    out = array.copy()
    out[top:bottom, left:right] = _broadcast(patch_pattern(spec["pattern"], bottom - top, spec.get("seed", 0)),
                                             out[top:bottom, left:right])
    return out


# ---- Blended ----------------------------------------------------------------------------

def blend_pattern(spec: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The pattern blended in: an image file resized to `shape`, or seeded uniform noise."""
    if spec.get("image"):
        with Image.open(spec["image"]) as img:
            img = img.convert("RGB" if len(shape) == 3 else "L").resize((shape[1], shape[0]), Image.BILINEAR)
            pattern = np.asarray(img, dtype=np.uint8)
        return _broadcast(pattern, np.empty(shape)) if len(shape) == 3 and pattern.ndim == 2 else pattern
    return np.random.default_rng([spec.get("seed", 0), *shape]).integers(0, 256, shape, dtype=np.uint8)


def blend(array: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * pattern, rounded back to uint8."""
    mixed = (1.0 - alpha) * array.astype(np.float64) + alpha * pattern.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# ---- WaNet ------------------------------------------------------------------------------

def wanet_grid(height: int, width: int, strength: float, grid_size: int, seed: int = 0) -> np.ndarray:
    """WaNet's warping grid (Nguyen & Tran, ICLR 2021) as a (1, H, W, 2) array for
    `grid_sample`: a random k x k field of 2-D offsets in [-1, 1], normalised by its
    mean magnitude, upsampled bicubically to the image, scaled by strength / H,
    added to the identity grid and clamped to the image."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng([seed, grid_size])
    control = rng.uniform(-1.0, 1.0, (1, 2, grid_size, grid_size))
    control = control / np.mean(np.abs(control))
    field = F.interpolate(torch.from_numpy(control), size=(height, width), mode="bicubic",
                          align_corners=True).permute(0, 2, 3, 1).numpy()
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    identity = np.stack([xs, ys], axis=-1)[None]  # grid_sample wants (x, y)
    return np.clip(identity + strength * field / height, -1.0, 1.0)


def warp(array: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Resample the image along `grid` (bilinear, as WaNet), rounded back to uint8."""
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(array.astype(np.float64))
    image = image[None, None] if array.ndim == 2 else image.permute(2, 0, 1)[None]
    out = F.grid_sample(image, torch.from_numpy(grid), mode="bilinear", align_corners=True)[0]
    out = out[0] if array.ndim == 2 else out.permute(1, 2, 0)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


# ---- specs --------------------------------------------------------------------------------

@dataclass
class Trigger:
    """A trigger rebuilt from its spec; call it on a PIL image or a uint8 array."""

    spec: dict
    _cache: dict = field(default_factory=dict, repr=False)

    def apply_array(self, array: np.ndarray) -> np.ndarray:
        kind = self.spec["type"]
        if kind == "badnet":
            return paste_patch(array, self.spec)
        key = array.shape
        if kind == "blended":
            if key not in self._cache:
                self._cache[key] = blend_pattern(self.spec, array.shape)
            return blend(array, self._cache[key], self.spec["alpha"])
        if kind == "wanet":
            if key[:2] not in self._cache:
                self._cache[key[:2]] = wanet_grid(array.shape[0], array.shape[1], self.spec["strength"],
                                                  self.spec["grid_size"], self.spec.get("seed", 0))
            return warp(array, self._cache[key[:2]])
        raise ValueError(f"unknown trigger type {kind!r}")

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        out = self.apply_array(as_array(image))
        return Image.fromarray(out) if isinstance(image, Image.Image) else out


def badnet_spec(size: float = 3, position: str | tuple[float, float] = "bottom-right",
                pattern: str = "checkerboard", margin: float = 1, seed: int = 0) -> dict:
    """A BadNet patch: `size` px square (at 28 px), `margin` px from the corner."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown patch pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if not 0 < size < math.inf:
        raise ValueError("patch size must be > 0 (and finite)")
    if isinstance(position, str) and position not in CORNERS:
        raise ValueError(f"unknown position {position!r}; choose one of {', '.join(CORNERS)} or X,Y")
    return {"type": "badnet", "size": size, "position": position if isinstance(position, str) else list(position),
            "pattern": pattern, "margin": margin, "seed": seed, "reference_size": REFERENCE_SIZE}


def blended_spec(alpha: float = 0.2, seed: int = 0, image: str | None = None) -> dict:
    """Blended: seeded uniform noise (or an image file) mixed in with weight `alpha`."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    return {"type": "blended", "alpha": alpha, "seed": seed, "image": image}


def wanet_spec(strength: float = 0.5, grid_size: int = 4, seed: int = 0) -> dict:
    """WaNet: warping strength s and control grid k (the paper's defaults: 0.5, 4)."""
    if not 0 < strength < math.inf or grid_size < 2:
        raise ValueError("wanet needs strength > 0 and grid size >= 2")
    return {"type": "wanet", "strength": strength, "grid_size": grid_size, "seed": seed}


SPEC_BUILDERS: dict[str, Callable[..., dict]] = {"badnet": badnet_spec, "blended": blended_spec,
                                                 "wanet": wanet_spec}


def trigger_from_spec(spec: dict) -> Trigger:
    """Rebuild a trigger from the spec stored in a manifest (validates it)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SPEC_BUILDERS:
        raise ValueError(f"unknown trigger type {kind!r}; choose one of {', '.join(TRIGGER_TYPES)}")
    spec.pop("reference_size", None)
    return Trigger(SPEC_BUILDERS[kind](**spec))


def spec_for_attack(attack: str, trigger: str = "badnet", *, seed: int = 0, patch_size: float = 3,
                    position: str = "bottom-right", pattern: str = "checkerboard", alpha: float = 0.2,
                    blend_image: str | None = None, strength: float = 0.5, grid_size: int = 4) -> dict | None:
    """The trigger spec `safeclip poison` options describe: the attack's own trigger, or
    `trigger` for label-consistent poisons; None for targeted poisoning (no trigger)."""
    kind = trigger if attack == "label-consistent" else attack
    if kind == "badnet":
        return badnet_spec(patch_size, parse_position(position), pattern, seed=seed)
    if kind == "blended":
        if blend_image is not None and not Path(blend_image).is_file():
            raise FileNotFoundError(f"{blend_image}: no such image")
        return blended_spec(alpha, seed, blend_image)
    if kind == "wanet":
        return wanet_spec(strength, grid_size, seed)
    if attack == "label-consistent":
        raise ValueError(f"unknown --trigger {trigger!r}; choose badnet, blended or wanet")
    return None


def parse_position(text: str) -> str | tuple[float, float]:
    """CLI helper: a corner name or "X,Y" (pixels at 28 px, top-left of the patch)."""
    if "," in text:
        x, y = text.split(",", 1)
        try:
            return float(x), float(y)
        except ValueError:
            raise ValueError(f"position {text!r}: expected X,Y numbers or one of {', '.join(CORNERS)}")
    return text
