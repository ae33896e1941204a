"""Captioned Fashion-MNIST: real images, web-like captions, a little natural noise.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT, (c) Zalando SE) has 60,000 train
and 10,000 test 28x28 grayscale images in 10 classes. CLIP needs captions, not
labels, so every image gets a caption from a seeded generator: one of
`CAPTION_TEMPLATES`, a synonym of its class, optional adjectives and context.
A share of captions (`noise`) is then swapped for the caption of a random pair
of another class, as happens on the web; those pairs are marked `noise=True`.
Noise is applied to the train split only: test captions stay truthful.

Keys are stable and img2dataset-like: train pairs are the 9-digit source index
(`000001234`), which is what img2dataset would name them with 10,000 samples per
shard; test pairs are `test-` + the same (`test-000001234`), so the two splits
never share a key. A subset (`train_size`) keeps the full set's keys.

Metadata per pair (in `{key}.json` and the sidecar parquet): `label` (true
class id), `class_name`, `caption_label` (the class the caption names), `split`,
`source_index`, `noise`.

The bundled sample (`sample_path()`) is regenerated with
`python -m sanitize.fashion_mnist --write-sample`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .pairs import SIZES_FILE, Pair
from .shards import ShardWriter, atomic_write_bytes, atomic_write_json

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
KEY_PREFIX = {"train": "", "test": "test-"}

# Class names in label order (metadata, manifests, tables). Zero-shot prompts use the
# everyday plural words of `sanitize.templates` instead: captions never say "trouser".
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# Words a caption may use for each class: (text, is_plural). Plural nouns take
# "a pair of"/no article instead of "a".
CLASS_SYNONYMS: dict[str, tuple[tuple[str, bool], ...]] = {
    "t-shirt": (("t-shirt", False), ("tee", False), ("top", False), ("tshirt", False), ("crew neck tee", False)),
    "trouser": (("trousers", True), ("pants", True), ("jeans", True), ("slacks", True), ("chinos", True)),
    "pullover": (("pullover", False), ("sweater", False), ("jumper", False), ("knit sweater", False),
                 ("sweatshirt", False)),
    "dress": (("dress", False), ("gown", False), ("sundress", False), ("frock", False), ("midi dress", False)),
    "coat": (("coat", False), ("jacket", False), ("parka", False), ("overcoat", False), ("trench coat", False)),
    "sandal": (("sandals", True), ("flip-flops", True), ("slides", True), ("strappy sandals", True)),
    "shirt": (("shirt", False), ("blouse", False), ("button-down shirt", False), ("flannel shirt", False),
              ("dress shirt", False)),
    "sneaker": (("sneakers", True), ("trainers", True), ("running shoes", True), ("tennis shoes", True),
                ("kicks", True)),
    "bag": (("bag", False), ("handbag", False), ("purse", False), ("tote", False), ("backpack", False),
            ("shoulder bag", False)),
    "ankle boot": (("ankle boots", True), ("boots", True), ("booties", True), ("chelsea boots", True),
                   ("short boots", True)),
}

ADJECTIVES = ("new", "vintage", "classic", "casual", "elegant", "cheap", "stylish", "comfortable",
              "black", "white", "grey", "navy", "beige", "striped", "plain", "oversized", "slim",
              "leather", "cotton", "women's", "men's", "kids'", "summer", "winter")

CONTEXTS = ("on a white background", "for sale", "in black and white", "front view", "flat lay",
            "product photo", "size M", "free shipping", "on a mannequin", "studio shot",
            "from our new collection", "low resolution", "second hand", "best seller")

# Training captions. Evaluation must use *different* prompts (zero-shot), so keep
# these in this one constant. {a_item}: item with article ("a grey dress", "a pair
# of jeans"); {item}: bare ("grey dress", "jeans"); {context}: a context phrase.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_item}",
    "{a_item}",
    "{item}",
    "{item}, {context}",
    "picture of {a_item} {context}",
    "{a_item} {context}",
    "buy {item} online",
    "close-up of {a_item}",
    "my favourite {item}",
    "{item} for women and men",
    "here is {a_item} i found at the thrift store",
    "catalog image: {item}",
    "this {item} is on sale today",
    "black and white photo of {a_item}",
    "{item} | {context}",
    "look at {a_item}!",
    "thumbnail of {a_item}",
    "someone selling {a_item}",
    "{a_item} in a shop window",
    "fashion item: {item}",
)


def _article(phrase: str, plural: bool, rng: np.random.Generator) -> str:
    if plural:
        return f"{['a pair of', 'some'][rng.integers(2)]} {phrase}" if rng.random() < 0.7 else phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_for(class_id: int, rng: np.random.Generator) -> str:
    """A random caption naming class `class_id`, drawn with `rng` (seeded by the caller)."""
    name = FASHION_MNIST_CLASSES[class_id]
    synonyms = CLASS_SYNONYMS[name]
    noun, plural = synonyms[rng.integers(len(synonyms))]
    words = []
    if rng.random() < 0.5:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    item = " ".join(words + [noun])
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    context = CONTEXTS[rng.integers(len(CONTEXTS))]
    return template.format(a_item=_article(item, plural, rng), item=item, context=context)


def class_words(class_name: str) -> tuple[str, ...]:
    """Every word a caption may use for a class (lower case), for caption matching."""
    return tuple(s for s, _ in CLASS_SYNONYMS[class_name]) + (class_name,)


# ---- idx files ---------------------------------------------------------------------

def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).exists():
            return source / name
    raise FileNotFoundError(f"{source / stem}[.gz]: Fashion-MNIST idx file not found "
                            f"(install Debian's dataset-fashion-mnist or pass --source DIR)")


def read_idx_header(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape stored in an idx file's header (without reading the data)."""
    with _open_idx(Path(path)) as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte idx file")
        ndim = magic[3]
        return struct.unpack(">" + "I" * ndim, f.read(4 * ndim))


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped or not) into a uint8 array of its stored shape."""
    shape = read_idx_header(path)
    with _open_idx(Path(path)) as f:
        f.seek(4 + 4 * len(shape))
        data = f.read()
    expected = int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: truncated idx file ({len(data)} of {expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def load_split(split: str, source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of one split, from `source` or Debian's package."""
    source = Path(source or DEBIAN_DIR)
    images_stem, labels_stem = SPLIT_FILES[split]
    images = load_idx(_find(source, images_stem))
    labels = load_idx(_find(source, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{source}: {split} labels outside 0..9")
    return images, labels


# ---- building ----------------------------------------------------------------------

def balanced_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced random subset of `size`, in source order."""
    if size >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def make_captions(labels: np.ndarray, noise: float,
                  rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions for `labels`, with round(noise * n) of them swapped for the caption of
    a random pair of a different class. Returns (captions, caption_labels, is_noise)."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    n = len(labels)
    clean = [caption_for(int(c), rng) for c in labels]
    captions = list(clean)
    caption_labels = labels.astype(np.int64).copy()
    is_noise = np.zeros(n, dtype=bool)
    n_noise = int(round(noise * n))
    if n_noise and len(np.unique(labels)) < 2:
        raise ValueError("noise needs at least two classes")
    for i in rng.choice(n, size=n_noise, replace=False):
        j = int(rng.integers(n))
        while labels[j] == labels[i]:  # rejection: most draws already differ
            j = int(rng.integers(n))
        captions[i] = clean[j]
        caption_labels[i] = labels[j]
        is_noise[i] = True
    return captions, caption_labels, is_noise


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG: lossless, so pixels (and trigger patterns) survive exactly."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def split_pairs(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str,
                noise: float, rng: np.random.Generator) -> Iterator[Pair]:
    """The captioned pairs of `indices` of one split, in index order."""
    sub_labels = labels[indices]
    captions, caption_labels, is_noise = make_captions(sub_labels, noise, rng)
    for pos, index in enumerate(indices):
        array = images[index]
        label = int(sub_labels[pos])
        meta = {"label": label, "class_name": FASHION_MNIST_CLASSES[label],
                "caption_label": int(caption_labels[pos]), "split": split,
                "source_index": int(index), "noise": bool(is_noise[pos])}
        image = Image.fromarray(array)
        yield Pair(key=f"{KEY_PREFIX[split]}{int(index):09d}", caption=captions[pos],
                   image=image, image_bytes=png_bytes(image), image_ext="png", meta=meta)


@dataclass
class SplitStats:
    split: str
    pairs: int
    noise_pairs: int
    per_class: dict
    distinct_captions_per_class: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def write_split(pairs: Iterable[Pair], out_dir: str | os.PathLike, split: str,
                samples_per_shard: int = 10000) -> SplitStats:
    """Write one split's pairs as shards and return counts for the stats file."""
    per_class: Counter = Counter()
    captions: dict[str, set] = {}
    noise_pairs = 0
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for pair in pairs:
            writer.write(pair)
            name = pair.meta["class_name"]
            per_class[name] += 1
            noise_pairs += pair.meta["noise"]
            if not pair.meta["noise"]:
                captions.setdefault(name, set()).add(pair.caption)
    return SplitStats(split, writer.written, noise_pairs, dict(sorted(per_class.items())),
                      {k: len(v) for k, v in sorted(captions.items())})


def build(out: str | os.PathLike, source: str | os.PathLike | None = None, noise: float = 0.03, seed: int = 0,
          train_size: int | None = None, test_size: int | None = None, samples_per_shard: int = 10000,
          wrap: Callable[[Iterator[Pair], int, str], Iterable[Pair]] | None = None) -> dict:
    """Build `out/train/` and `out/test/` and `out/_stats.json`; returns the stats.

    Noise is applied to train captions only: the test set is for evaluation, which
    reads labels, and its captions stay truthful. `wrap(pairs, total, split)` lets
    the CLI add a progress bar.
    """
    out = Path(out)
    for split in ("train", "test"):
        if (out / split).exists() and any((out / split).iterdir()):
            raise FileExistsError(f"{out / split}: exists and is not empty; choose a new --out")
    stats: dict = {"dataset": "fashion-mnist", "source": str(source) if source else "debian:dataset-fashion-mnist",
                   "seed": seed,
                   "noise": noise, "noise_applies_to": "train", "splits": {}}
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = load_split(split, source)
        if size is not None and size < 1:
            raise ValueError(f"--{split}-size must be >= 1")
        split_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        indices = balanced_subset(labels, size, split_rng) if size else np.arange(len(labels))
        pairs = split_pairs(images, labels, indices, split, noise if split == "train" else 0.0, split_rng)
        if wrap is not None:
            pairs = wrap(pairs, len(indices), split)
        stats["splits"][split] = write_split(pairs, out / split, split, samples_per_shard).as_dict()
    atomic_write_json(out / "_stats.json", stats)
    return stats


# ---- bundled sample ------------------------------------------------------------------

SAMPLE_TRAIN, SAMPLE_TEST, SAMPLE_SEED, SAMPLE_NOISE = 5000, 1000, 0, 0.03


def sample_path() -> Path:
    """The bundled sample (5,000 train + 1,000 test pairs): `sample_path() / "train"`."""
    return Path(__file__).parents[1] / "data" / "fashion-mnist-sample"


def gzip_shards(folder: str | os.PathLike) -> None:
    """Compress `NNNNN.tar` to `NNNNN.tar.gz` in place (deterministic: no timestamp).

    Tar pads every member to 512 bytes, so a 300-byte PNG + caption + json takes
    3 KB; gzip brings the sample from ~20 MB to ~3.5 MB. Our reader, webdataset
    and open_clip all read .tar.gz shards.
    """
    folder = Path(folder)
    sizes_path = folder / SIZES_FILE
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    for tar in sorted(folder.glob("*.tar")):
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
            gz.write(tar.read_bytes())
        atomic_write_bytes(tar.with_name(tar.name + ".gz"), buffer.getvalue())
        tar.unlink()
        if tar.name in sizes:
            sizes[tar.name + ".gz"] = sizes.pop(tar.name)
    atomic_write_json(sizes_path, dict(sorted(sizes.items())))


def write_sample(out: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> dict:
    """Regenerate the bundled sample deterministically (the licence note is kept)."""
    out = Path(out) if out else sample_path()
    for split in ("train", "test"):
        for f in (out / split).glob("*") if (out / split).exists() else ():
            f.unlink()
    stats = build(out, source, noise=SAMPLE_NOISE, seed=SAMPLE_SEED, train_size=SAMPLE_TRAIN,
                  test_size=SAMPLE_TEST)
    for split in ("train", "test"):
        gzip_shards(out / split)
    return stats


if __name__ == "__main__":  # python -m sanitize.fashion_mnist --write-sample [--source DIR]
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate the bundled Fashion-MNIST sample.")
    parser.add_argument("--write-sample", action="store_true", required=True)
    parser.add_argument("--source", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(write_sample(args.out, args.source))
