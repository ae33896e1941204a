"""Poison injection for red-teaming, with a ground-truth manifest.

`poison(src, out, config)` writes a poisoned copy of a pair source to `out/`:
every source pair keeps its key, and poison pairs are *added* with new keys
(`poison-badnet-000012`), scattered among the clean pairs at seeded positions
(as web-scraped poisons would be, and so a streaming loader does not see them
in one block). Beside the shards: `manifest.parquet` (one row per output pair:
key, attack, kind = clean/poison/noise, target_class, true_class, source_key,
trigger spec as JSON, run) and `poison.json` (the full config of every run, seed,
counts).

Attacks (all seeded):
  targeted          TDPA: N target images from a separate source (e.g. the test
                    set), each added P times with captions of one adversarial class.
  badnet / blended / wanet
                    the trigger on copies of images of non-target classes, captions
                    replaced by captions of the target class.
  label-consistent  the trigger (badnet by default) on copies of images that are
                    already of the target class; captions kept.

Several attacks: run `poison` again on a poisoned output. The new output keeps
the earlier manifest rows, adds the new run's, and never poisons an earlier
poison pair again; `poison.json` lists every run.

Captions: on captioned Fashion-MNIST a poison's caption is generated for its
Fashion-MNIST class (the defaults). On any other data give the captions poisons
carry (`target_captions`, sampled per poison pair) and/or a `target_class` name:
any name, used as the manifest's label (eval's attack success needs it among its
--classes) and to keep pairs of that class out of the backdoor's images; without
captions a non-Fashion-MNIST class gets "a photo of a NAME". Targeted poisoning
then gives every target the same adversarial captions and class.

Poisoned images are written as PNG so trigger pixels stay exact. Pairs whose
class is not in their metadata (`class_name`, or on Fashion-MNIST an integer
`label`) are classed by whether their caption names the target class (any of its
synonyms on Fashion-MNIST, the name itself otherwise).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..io.artifacts import (POISON_COLUMNS, poison_manifest_path, poison_summary_path, read_poison_manifest,
                           read_poison_summary, write_poison_manifest, write_poison_summary)
from ..io.fashion_mnist import FASHION_MNIST_CLASSES, caption_for, class_words, png_bytes
from ..io.pairs import Pair, PairSource, decode_image, open_pairs
from ..io.shards import ShardWriter
from .triggers import Trigger, trigger_from_spec

ATTACKS = ("targeted", "badnet", "blended", "wanet", "label-consistent")
BACKDOORS = ("badnet", "blended", "wanet", "label-consistent")
DEFAULT_SHARE = 0.0025  # BadNet-style poisoning rate used when neither count nor share is given


@dataclass
class PoisonConfig:
    """What to inject. `trigger` is a spec from `sanitize.triggers` (backdoors only)."""

    attack: str
    seed: int = 0
    target_class: str | None = None  # backdoors: the class the trigger should evoke
    count: int | None = None         # backdoors: number of poison pairs ...
    share: float | None = None       # ... or their share of the source's pair count
    trigger: dict | None = None
    targets: int = 16                # targeted: number of target images
    copies: int = 25                 # targeted: poison pairs per target
    target_source: str | None = None
    target_captions: list[str] | None = None  # the captions poison pairs carry, one drawn per pair

    @property
    def fashion_mnist(self) -> bool:
        """Captions and classes are Fashion-MNIST's (the generated-caption defaults)."""
        if self.target_class is not None:
            return self.target_class in FASHION_MNIST_CLASSES
        return self.attack == "targeted" and not self.target_captions

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        if self.target_captions is not None:
            if not self.target_captions or any(not isinstance(c, str) or not c.strip()
                                               for c in self.target_captions):
                raise ValueError("target captions must be non-empty text")
            if self.attack == "label-consistent":
                raise ValueError("--attack label-consistent keeps the pairs' own captions; "
                                 "--target-caption does not apply")
        if self.target_class is not None and not self.target_class.strip():
            raise ValueError("--target-class must be a non-empty name")
        if self.attack == "targeted":
            if not self.target_source:
                raise ValueError("--attack targeted needs --target-source (the target images: any pair source)")
            if self.targets < 1 or self.copies < 1:
                raise ValueError("--targets and --copies must be >= 1")
            if self.count is not None or self.share is not None:
                raise ValueError("--attack targeted takes --targets and --copies, not --count/--share")
            return
        if self.target_class is None and (self.attack == "label-consistent" or not self.target_captions):
            needs = ("--target-class NAME" if self.attack == "label-consistent"
                     else "--target-class NAME and/or --target-caption TEXT")
            raise ValueError(f"--attack {self.attack} needs {needs} (Fashion-MNIST class names get "
                             f"generated captions: {', '.join(FASHION_MNIST_CLASSES)})")
        if self.count is not None and self.share is not None:
            raise ValueError("give --count or --share, not both")
        if self.count is not None and self.count < 1:
            raise ValueError("--count must be >= 1")
        if self.share is not None and not 0 < self.share < 1:
            raise ValueError("--share must be in (0, 1)")
        if not self.trigger:
            raise ValueError(f"--attack {self.attack} needs a trigger spec")


@dataclass
class Row:
    """What planning needs to know about one source pair."""

    key: str
    true_class: str | None
    caption: str
    noise: bool = False
    poison: bool = False  # a poison pair of an earlier run


@dataclass
class PoisonItem:
    """One poison pair to add: a copy of `source_key`, triggered and/or recaptioned."""

    key: str
    attack: str
    source_key: str
    true_class: str | None
    target_class: str
    caption: str | None   # None: keep the source caption
    trigger: dict | None
    position: int         # inserted before the source pair at this index (len = at the end)
    from_target_source: bool = False


# ---- pure core ------------------------------------------------------------------------

def class_of(meta: dict, fashion_mnist: bool = True) -> str | None:
    """The true class named in a pair's metadata, if any: on Fashion-MNIST its `class_name`
    or integer `label`; on other data its `class_name` (a label number means nothing there)."""
    name = meta.get("class_name")
    if not fashion_mnist:
        return name.strip() if isinstance(name, str) and name.strip() else None
    if name in FASHION_MNIST_CLASSES:
        return name
    label = meta.get("label")
    if isinstance(label, int) and 0 <= label < len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES[label]
    return None


def mentions(caption: str, class_name: str) -> bool:
    names = class_words(class_name) if class_name in FASHION_MNIST_CLASSES else (class_name.lower(),)
    words = sorted(names, key=len, reverse=True)
    return re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", caption.lower()) is not None


def _is_target(row: Row, target: str) -> bool:
    if row.true_class is not None:
        return row.true_class.lower() == target.lower()
    return mentions(row.caption, target)


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a text file, one a line (blank lines skipped); ValueError with one line
    when it cannot be read or holds none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read captions ({exc})") from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions in the file")
    return captions


def caption_drawer(config: PoisonConfig) -> Callable[[np.random.Generator], str]:
    """How a poison pair's caption is drawn: one of the given captions, a generated Fashion-MNIST
    caption of the target class, or "a photo of a NAME" for any other class."""
    if config.target_captions:
        captions = [c.strip() for c in config.target_captions]
        return lambda rng: captions[int(rng.integers(len(captions)))]
    target = config.target_class
    if target in FASHION_MNIST_CLASSES:
        return lambda rng: caption_for(FASHION_MNIST_CLASSES.index(target), rng)
    text = f"a photo of {_article(target)} {target}"
    return lambda rng: text


def poison_count(config: PoisonConfig, n_source: int) -> int:
    if config.count is not None:
        return config.count
    return max(1, int(round((config.share if config.share is not None else DEFAULT_SHARE) * n_source)))


def plan(config: PoisonConfig, rows: list[Row], target_rows: list[Row] | None = None,
         existing_keys: Iterable[str] = ()) -> list[PoisonItem]:
    """Decide every poison pair (which source, new key, caption, trigger, position).

    Pure and seeded: equal inputs give an equal plan. Raises ValueError when the
    source has too few eligible pairs."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    taken = set(existing_keys)
    prefix = f"poison-{config.attack}-"
    first = sum(1 for k in taken if k.startswith(prefix))  # continue numbering across runs
    items: list[PoisonItem] = []

    def new_key() -> str:
        key = f"{prefix}{first + len(items):06d}"
        if key in taken:
            raise ValueError(f"key {key} already exists in the source")
        return key

    if config.attack == "targeted" and config.target_class is None and not config.target_captions:
        # Fashion-MNIST: each target gets captions of a random other class.
        eligible = [r for r in (target_rows or []) if r.true_class is not None]
        if len(eligible) < config.targets:
            raise ValueError(f"target source has {len(eligible)} pairs with a known class; "
                             f"--targets {config.targets} needs more")
        for index in sorted(rng.choice(len(eligible), size=config.targets, replace=False)):
            target = eligible[index]
            others = [c for c in FASHION_MNIST_CLASSES if c != target.true_class]
            adversarial = others[int(rng.integers(len(others)))]
            for _ in range(config.copies):
                items.append(PoisonItem(new_key(), config.attack, target.key, target.true_class, adversarial,
                                        caption_for(FASHION_MNIST_CLASSES.index(adversarial), rng), None,
                                        0, from_target_source=True))
    elif config.attack == "targeted":
        # Any data: every target gets the given adversarial captions (and class label, if any).
        adversarial = config.target_class
        draw = caption_drawer(config)
        eligible = [r for r in (target_rows or []) if adversarial is None or not _is_target(r, adversarial)]
        if len(eligible) < config.targets:
            outside = f" outside class {adversarial!r}" if adversarial is not None else ""
            raise ValueError(f"target source has {len(eligible)} readable pairs{outside}; "
                             f"--targets {config.targets} needs more")
        for index in sorted(rng.choice(len(eligible), size=config.targets, replace=False)):
            target = eligible[index]
            for _ in range(config.copies):
                items.append(PoisonItem(new_key(), config.attack, target.key, target.true_class, adversarial,
                                        draw(rng), None, 0, from_target_source=True))
    else:
        target = config.target_class
        consistent = config.attack == "label-consistent"
        draw = None if consistent else caption_drawer(config)
        eligible = [r for r in rows if not r.poison and not r.noise
                    and (target is None or _is_target(r, target) == consistent)]
        count = poison_count(config, len(rows))
        if count > len(eligible):
            kind = "of" if consistent else "outside"
            where = f" {kind} class {target!r}" if target is not None else ""
            raise ValueError(f"{count} poison pairs requested but the source has only {len(eligible)} "
                             f"clean pairs{where}")
        for index in sorted(rng.choice(len(eligible), size=count, replace=False)):
            row = eligible[index]
            caption = None if consistent else draw(rng)
            items.append(PoisonItem(new_key(), config.attack, row.key, row.true_class, target, caption,
                                    config.trigger, 0))
    for item, position in zip(items, rng.integers(0, len(rows) + 1, size=len(items))):
        item.position = int(position)
    return items


def apply(pair: Pair, item: PoisonItem, trigger: Trigger | None) -> Pair:
    """The poison pair made from its source pair: triggered image (PNG), new caption.
    Metadata keeps the image's true class; provenance fields that would reveal or
    misstate the copy (sha256 of other bytes, split, index, noise flag) are dropped —
    the ground truth lives in the manifest only."""
    if trigger is None:  # targeted: the image itself is untouched
        data, ext = pair.image_bytes, pair.image_ext
    else:
        data, ext = png_bytes(trigger(pair.image)), "png"
    meta = {k: v for k, v in pair.meta.items()
            if k not in ("sha256", "split", "source_index", "noise", "key", "caption", "status")}
    if item.caption is not None and "caption_label" in meta:
        if item.target_class in FASHION_MNIST_CLASSES:
            meta["caption_label"] = FASHION_MNIST_CLASSES.index(item.target_class)
        else:
            del meta["caption_label"]  # the new caption names no Fashion-MNIST class
    return Pair(key=item.key, caption=item.caption if item.caption is not None else pair.caption,
                image=decode_image(data), image_bytes=data, image_ext=ext, meta=meta)


def interleave(pairs: Iterable[Pair], poisons: dict[int, list[Pair]]) -> Iterator[Pair]:
    """Source pairs with poison pairs inserted before the pair at each position."""
    index = -1
    for index, pair in enumerate(pairs):
        yield from poisons.get(index, ())
        yield pair
    for position in sorted(p for p in poisons if p > index):
        yield from poisons[position]


# ---- I/O -----------------------------------------------------------------------------------

Wrap = Callable[[Iterable, "int | None", str], Iterable]


def _no_wrap(items: Iterable, total: int | None, description: str) -> Iterable:
    return items


def read_rows(source: PairSource, previous: dict[str, dict], wrap: Wrap, what: str,
              fashion_mnist: bool = True) -> list[Row]:
    rows = []
    for pair in wrap(source, source.count_hint(), f"reading {what}"):
        old = previous.get(pair.key)
        rows.append(Row(pair.key, class_of(pair.meta, fashion_mnist), pair.caption,
                        bool(pair.meta.get("noise", False)), poison=old is not None and old["kind"] == "poison"))
    return rows


def load_previous(src: str) -> tuple[dict[str, dict], list[dict]]:
    """Manifest rows and runs of an earlier `poison` output, when `src` is one."""
    folder = Path(src)
    manifest, summary = poison_manifest_path(folder), poison_summary_path(folder)
    if not (folder.is_dir() and manifest.exists() and summary.exists()):
        return {}, []
    rows = read_poison_manifest(manifest)
    return {r["key"]: r for r in rows}, read_poison_summary(folder)["runs"]


def _check_out(out: Path, src: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new --out")
    if os.path.abspath(out) == os.path.abspath(src):
        raise ValueError("--out must differ from the source")


def poison(src: str, out: str | os.PathLike, config: PoisonConfig, samples_per_shard: int = 10000,
           wrap: Wrap = _no_wrap) -> dict:
    """Write the poisoned copy of `src` to `out`; returns the run summary (poison.json)."""
    config.validate()
    out = Path(out)
    _check_out(out, src)
    previous, runs = load_previous(src)
    source = open_pairs(src)
    fashion = config.fashion_mnist
    rows = read_rows(source, previous, wrap, "source", fashion)
    if not rows:
        raise ValueError(f"{src}: no readable pairs")
    target_rows, target_source = None, None
    if config.attack == "targeted":
        target_source = open_pairs(config.target_source)
        target_rows = read_rows(target_source, {}, wrap, "target source", fashion)
    items = plan(config, rows, target_rows, existing_keys=[r.key for r in rows])

    # Make the poison pairs (one more read of whichever source they come from).
    trigger = trigger_from_spec(config.trigger) if config.trigger else None
    needed: dict[str, list[PoisonItem]] = {}
    for item in items:
        needed.setdefault(item.source_key, []).append(item)
    made: dict[str, Pair] = {}
    for pair in wrap(target_source or open_pairs(src), len(rows) if target_source is None else None,
                     "poisoning"):
        for item in needed.get(pair.key, ()):
            made[item.key] = apply(pair, item, trigger)
    poisons: dict[int, list[Pair]] = {}
    for item in items:
        poisons.setdefault(item.position, []).append(made[item.key])

    run = len(runs)
    by_key = {item.key: item for item in items}
    trigger_json = json.dumps(config.trigger, sort_keys=True) if config.trigger else None
    manifest: list[dict] = []
    copy_source = open_pairs(src)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, samples_per_shard) as writer:
        for pair in wrap(interleave(copy_source, poisons), len(rows) + len(items), "writing"):
            writer.write(pair)
            item = by_key.get(pair.key)
            if item is not None:
                manifest.append({"key": item.key, "attack": item.attack, "kind": "poison",
                                 "target_class": item.target_class, "true_class": item.true_class,
                                 "source_key": item.source_key, "trigger": trigger_json, "run": run})
            elif pair.key in previous:
                manifest.append({c: previous[pair.key].get(c) for c in POISON_COLUMNS})
            else:
                manifest.append({"key": pair.key, "attack": None,
                                 "kind": "noise" if pair.meta.get("noise") else "clean",
                                 "target_class": None, "true_class": class_of(pair.meta, fashion),
                                 "source_key": pair.key, "trigger": None, "run": None})
    if len(made) != len(items):
        raise ValueError("some poison sources could not be read twice the same way")

    kinds = {k: sum(1 for r in manifest if r["kind"] == k) for k in ("clean", "poison", "noise")}
    this_run = {"run": run, "source": str(src), "config": asdict(config), "poison_pairs": len(items),
                "skipped_source_pairs": source.skips.as_dict()}
    if config.attack == "targeted":
        seen = {}
        for item in items:
            seen.setdefault(item.source_key, {"source_key": item.source_key, "true_class": item.true_class,
                                              "adversarial_class": item.target_class, "copies": 0})
            seen[item.source_key]["copies"] += 1
        this_run["targets"] = list(seen.values())
    summary = {"runs": runs + [this_run], "counts": {**kinds, "total": len(manifest)},
               "manifest": poison_manifest_path(out).name}
    write_poison_manifest(poison_manifest_path(out), manifest)
    write_poison_summary(out, summary)
    return summary
