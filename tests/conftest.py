"""Session-wide fixtures: a tiny poisoned-looking pair source and a checkpoint of the
shipped small model, built once (they are read-only for the tests that use them)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

# Two cores shared by everything; more threads only add contention in tests.
torch.set_num_threads(1)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASS_WORDS = ["red square", "green circle", "blue stripes", "white cross"]


def class_image(label: int, rng: np.random.Generator, size: int = 28) -> Image.Image:
    """A noisy image whose colour and shape depend on its label, so a model can tell them apart."""
    pixels = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    colour = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 230)][label]
    if label == 0:
        pixels[6:22, 6:22] = colour
    elif label == 1:
        yy, xx = np.mgrid[:size, :size]
        pixels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 64] = colour
    elif label == 2:
        pixels[::4] = colour
    else:
        pixels[12:16, :] = colour
        pixels[:, 12:16] = colour
    return Image.fromarray(pixels)


def write_class_pairs(out_dir, n: int, samples_per_shard: int, seed: int = 0) -> None:
    """`n` labelled pairs (PNG) in img2dataset layout, captions naming the class."""
    import io

    from sanitize.io.pairs import Pair
    from sanitize.io.shards import write_pairs

    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        label = int(rng.integers(0, len(CLASS_WORDS)))
        image = class_image(label, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pairs.append(Pair(key=f"{i:06d}", caption=f"a photo of a {CLASS_WORDS[label]}", image=image,
                          image_bytes=buffer.getvalue(), image_ext="png",
                          meta={"label": label, "url": f"http://127.0.0.1/{i}.png"}))
    write_pairs(pairs, out_dir, samples_per_shard=samples_per_shard)


@pytest.fixture(scope="session")
def class_pairs_dir(tmp_path_factory):
    """120 labelled pairs in 3 webdataset shards of 40."""
    out = tmp_path_factory.mktemp("class_pairs")
    write_class_pairs(out, 120, samples_per_shard=40)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained checkpoint of the shipped small model (seeded)."""
    from sanitize.models.checkpoint import save_checkpoint
    from sanitize.models.factory import create_model

    torch.manual_seed(0)
    model, _tokenizer, _size, config = create_model("safeclip-tiny-vit")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, config, training_state={})
    return path


def write_sample_subset(out_dir, n: int, samples_per_shard: int) -> None:
    """The first `n` pairs of the bundled Fashion-MNIST sample, as shards in `out_dir`."""
    import itertools

    from sanitize.io.fashion_mnist import sample_path
    from sanitize.io.pairs import open_pairs
    from sanitize.io.shards import write_pairs

    source = open_pairs(str(sample_path() / "train"))
    assert write_pairs(itertools.islice(source, n), out_dir, samples_per_shard=samples_per_shard) == n
