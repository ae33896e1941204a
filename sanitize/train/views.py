"""SimCLR-style image views made on whole batches, on the training device.

The data workers only decode: each image becomes a uint8 square at the model's input
size (shorter side resized, centre crop), and for each of its views a row of
parameters is drawn from the sample's own seed (`draw_view_params`). The trainer then
makes every view of the batch at once on its device (`BatchViews`, kornia's batched
functional ops): random resized crop, horizontal flip, colour jitter (p 0.8, in a
random order per image), grayscale (p 0.2), Gaussian blur (p 0.5), normalisation.

A view is a function of (run seed, epoch, shard, position) only, as before: not of the
batch it lands in, the number of workers, or where a resumed run restarted. What moved
is the cost: one tensor program per batch instead of a PIL pipeline per image in a
worker (docs/performance.md measures both), and on a GPU it runs on the GPU.

Difference from the per-image PIL transform (`augment.train_transform`): the crop is taken
from the model-size square rather than the full decoded image, so a non-square image
loses its margins before cropping, and resampling is bicubic without antialiasing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# open_clip's normalisation, as every other transform of the project
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.5, 0.5, 0.5, 0.1)      # brightness, contrast, saturation, hue (SimCLR / SafeCLIP)
P_JITTER, P_GRAY, P_BLUR = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)
# One row per view: crop (x, y, w, h in base pixels), flip, jitter?, 4 jitter factors,
# jitter order (a permutation of 0..3), grayscale?, blur?, blur sigma.
PARAMS = ("x", "y", "w", "h", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
          "order0", "order1", "order2", "order3", "gray", "blur", "sigma")
COL = {name: i for i, name in enumerate(PARAMS)}


def base_image(image: Image.Image, size: int) -> np.ndarray:
    """A decoded image as the (3, size, size) uint8 square the views are cut from."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


class _Uniforms:
    """Uniform [0, 1) numbers from one seed (a SeedSequence's state: cheaper than a
    Generator per image, and as well mixed)."""

    def __init__(self, seed: int, n: int = 64):
        self.u = np.random.SeedSequence(seed).generate_state(n, np.uint64) >> np.uint64(11)
        self.i = 0

    def __call__(self, low: float = 0.0, high: float = 1.0) -> float:
        if self.i == len(self.u):  # never in practice (a view takes at most 30)
            self.u, self.i = np.random.SeedSequence([int(self.u[-1]), 1]).generate_state(64, np.uint64) >> 11, 0
        value = float(self.u[self.i]) * 2.0 ** -53
        self.i += 1
        return low + (high - low) * value

    def integer(self, high: int) -> int:
        """Uniform in 0..high-1."""
        return min(high - 1, int(self() * high))


def _crop_box(u: _Uniforms, size: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on a size x size image: (x, y, w, h)."""
    area = size * size
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * u(*scale)
        aspect = math.exp(u(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            return u.integer(size - w + 1), u.integer(size - h + 1), w, h
    return 0, 0, size, size  # a square image is within the ratio range: the whole image


def draw_view_params(seed: int, size: int, crop_scale: tuple[float, float], views: int = 2) -> np.ndarray:
    """The parameters of `views` views of one image, from that sample's seed: (views, len(PARAMS))."""
    u = _Uniforms(seed, 32 * views)
    out = np.zeros((views, len(PARAMS)), dtype=np.float32)
    b, c, s, hue = JITTER
    for row in out:
        row[0:4] = _crop_box(u, size, crop_scale)
        row[COL["flip"]] = u() < 0.5
        row[COL["jitter"]] = u() < P_JITTER
        row[COL["brightness"]:COL["hue"] + 1] = (u(1 - b, 1 + b), u(1 - c, 1 + c), u(1 - s, 1 + s), u(-hue, hue))
        order = [0, 1, 2, 3]
        for i in range(3, 0, -1):  # Fisher-Yates
            j = u.integer(i + 1)
            order[i], order[j] = order[j], order[i]
        row[COL["order0"]:COL["order3"] + 1] = order
        row[COL["gray"]] = u() < P_GRAY
        row[COL["blur"]] = u() < P_BLUR
        row[COL["sigma"]] = u(*BLUR_SIGMA)
    return out


def blur_kernel(size: int) -> int:
    """~10% of the image side, odd, at least 3 (SimCLR's rule)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class BatchViews:
    """Makes the views of a uint8 batch on its device: `views(images, params)` with images
    (N, 3, S, S) uint8 and params (N, V, len(PARAMS)) returns V normalised (N, 3, S, S) tensors."""

    def __init__(self, image_size: int):
        self.size = image_size
        self.kernel = blur_kernel(image_size)
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div_(255)
        params = params.to(x.device, torch.float32)
        if x.device.type != "cpu":
            return [self.view(x, params[:, v]) for v in range(params.shape[1])]
        # One thread on a CPU, as in a data worker: a view is then the same bits wherever it is made.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self.view(x, params[:, v]) for v in range(params.shape[1])]
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def view(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        from kornia.color import rgb_to_grayscale
        from kornia.filters import gaussian_blur2d
        from kornia.geometry.transform import crop_and_resize

        x0, y0, w, h = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
        x1, y1 = x0 + w - 1, y0 + h - 1
        boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                             torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1)
        out = crop_and_resize(x, boxes, (self.size, self.size), mode="bicubic").clamp_(0, 1)
        flip = p[:, COL["flip"]] > 0.5
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        out = self._jitter(out, p)
        gray = (p[:, COL["gray"]] > 0.5).view(-1, 1, 1, 1)
        out = torch.where(gray, rgb_to_grayscale(out).expand_as(out), out)
        blur = p[:, COL["blur"]] > 0.5
        if blur.any():
            sigma = p[blur, COL["sigma"]].unsqueeze(1).expand(-1, 2).contiguous()
            out = out.clone()
            out[blur] = gaussian_blur2d(out[blur], (self.kernel, self.kernel), sigma, border_type="reflect")
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    @staticmethod
    def _jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """torchvision's ColorJitter per image: its own factors, in its own random order.
        Saturation and hue leave a gray image as it is, so gray images skip them (the
        hue step, a round trip through HSV, is most of the cost)."""
        from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_hue,
                                    adjust_saturation_with_gray_subtraction)

        steps = (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                 adjust_saturation_with_gray_subtraction, lambda im, f: adjust_hue(im, f * 2 * math.pi))
        on = p[:, COL["jitter"]] > 0.5
        if not on.any():
            return x
        colour = (x[:, 0] != x[:, 1]).flatten(1).any(1) | (x[:, 1] != x[:, 2]).flatten(1).any(1)
        x = x.clone()
        for slot in range(4):
            which = p[:, COL["order0"] + slot].round().long()
            for op, fn in enumerate(steps):
                rows = on & (which == op) & (colour if op >= 2 else True)
                if rows.any():
                    x[rows] = fn(x[rows], p[rows, COL["brightness"] + op]).clamp(0, 1)
        return x


class SeededView:
    """One view per image, the n-th call drawn from (seed, n): `safeclip embed --augment`'s
    per-image transform (in a worker each worker counts its own images)."""

    def __init__(self, image_size: int, seed: int, crop_scale: tuple[float, float] = (0.5, 1.0)):
        self.size, self.seed, self.crop_scale, self.count = image_size, seed, crop_scale, 0
        self.views = BatchViews(image_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        params = draw_view_params(int(np.random.SeedSequence([self.seed, self.count]).generate_state(1)[0]),
                                  self.size, self.crop_scale, views=1)
        self.count += 1
        square = torch.from_numpy(base_image(image, self.size)).unsqueeze(0)
        return self.views(square, torch.from_numpy(params).unsqueeze(0))[0][0]
