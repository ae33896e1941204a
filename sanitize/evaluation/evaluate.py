"""`safeclip eval`: does the trained model classify well, and did the attacks work?

The metrics are pure functions in `metrics.py`; this module is the I/O around them:
image features of a pair source with a checkpoint (batched, optionally with a
backdoor trigger applied exactly as `safeclip poison` does), the poison manifest's
attacks and targets, and a split joined to its ground truth through the query views.
`evaluate()` runs whichever parts its inputs allow and returns one JSON-able dict.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..io.artifacts import read_poison_manifest
from .metrics import (attack_success, detection_metrics, linear_probe, predict, targeted_success,
                      zero_shot_report, zero_shot_scores, zero_shot_weights)

T = TypeVar("T")
BACKDOOR_ATTACKS = ("badnet", "blended", "wanet", "label-consistent")


# ---- ground truth ---------------------------------------------------------------------

def backdoors_in(rows: list[dict]) -> list[dict]:
    """One entry per distinct backdoor (attack, trigger spec, target class) in the manifest."""
    found: dict[tuple, dict] = {}
    for r in rows:
        if r["kind"] != "poison" or r["attack"] not in BACKDOOR_ATTACKS:
            continue
        if not r["trigger"]:
            raise ValueError(f"manifest row {r['key']}: {r['attack']} poison without a trigger spec")
        key = (r["attack"], r["trigger"], r["target_class"])
        entry = found.setdefault(key, {"attack": r["attack"], "target_class": r["target_class"],
                                       "trigger": json.loads(r["trigger"]), "run": r.get("run"), "poisons": 0})
        entry["poisons"] += 1
    out = sorted(found.values(), key=lambda e: (BACKDOOR_ATTACKS.index(e["attack"]), e["run"] or 0))
    for entry in out:  # name repeated attacks apart
        same = [e for e in out if e["attack"] == entry["attack"]]
        entry["name"] = entry["attack"] if len(same) == 1 else f"{entry['attack']}#{entry['run']}"
    return out


def targets_in(rows: list[dict]) -> list[dict]:
    """TDPA targets: one entry per target image (source_key) with its adversarial class."""
    found: dict[str, dict] = {}
    for r in rows:
        if r["kind"] != "poison" or r["attack"] != "targeted":
            continue
        entry = found.setdefault(r["source_key"], {"source_key": r["source_key"], "adversarial_class":
                                                   r["target_class"], "true_class": r.get("true_class"),
                                                   "copies": 0})
        entry["copies"] += 1
    return list(found.values())


def _check_split(part: str | os.PathLike, truth: str | None) -> None:
    """Fail before any encoding when the split or its ground truth cannot be found."""
    from ..stages.query import locate

    if locate(part, truth=truth).truth is None:
        raise FileNotFoundError(f"{part}: no poison manifest found beside the split's source; pass --truth")


def read_split_truth(part: str | os.PathLike, truth: str | None = None) -> dict[str, np.ndarray]:
    """kind, attack, risky, p_clean, rank of every pair of a split, joined to the manifest."""
    from ..stages.query import connect

    _check_split(part, truth)
    con = connect(part, truth=truth)
    table = con.sql("""
        SELECT t.kind, t.attack, p.partition = 'risky' AS risky, p.p_clean, p.rank
        FROM pairs p LEFT JOIN truth t USING (key)""").to_arrow_table()
    if table.num_rows == 0:
        raise ValueError(f"{part}: the split holds no pairs")
    return {"kind": np.array(table["kind"].to_pylist(), dtype=object),
            "attack": np.array(table["attack"].to_pylist(), dtype=object),
            "risky": table["risky"].to_numpy(zero_copy_only=False).astype(bool),
            "p_clean": table["p_clean"].to_numpy(zero_copy_only=False).astype(np.float64),
            "rank": table["rank"].to_numpy(zero_copy_only=False).astype(np.int64)}


def split_detection(part: str | os.PathLike, truth: str | None = None) -> dict:
    """Detection quality of a split against its poison manifest (see `metrics.detection_metrics`)."""
    return detection_metrics(**read_split_truth(part, truth))


# ---- features -------------------------------------------------------------------------

def label_of(meta: dict, class_index: dict[str, int]) -> int:
    """A pair's class id among the evaluated classes: `class_name` if it is one of them,
    else an integer `label` in range; -1 when neither."""
    name = meta.get("class_name")
    if isinstance(name, str) and name in class_index:
        return class_index[name]
    label = meta.get("label")
    if isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < len(class_index):
        return int(label)
    return -1


def text_embeddings(model, tokenizer: Callable, prompt_names: list[str], templates: list[str], *,
                    device: str = "cpu", batch_size: int = 1024) -> np.ndarray:
    """(C, T, D) L2-normalised embeddings of every class x template prompt."""
    import torch
    import torch.nn.functional as F

    from .templates import prompts

    texts = prompts(prompt_names, templates)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu().numpy())
    return np.concatenate(parts).reshape(len(prompt_names), len(templates), -1)


@dataclass
class Features:
    """Image features of a pair source: `image` for the plain images and one array per
    trigger variant, row-aligned with `keys` and `labels` (-1 = class unknown)."""

    keys: list[str]
    labels: np.ndarray
    image: np.ndarray
    variants: dict[str, np.ndarray] = field(default_factory=dict)


def _identity_track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    return iter(items)


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_features(source, model, transform: Callable, classes: list[str], *,
                   variants: dict[str, Callable] | None = None, batch_size: int = 256, device: str = "cpu",
                   track: Callable = _identity_track, description: str = "images") -> Features:
    """Encode every readable pair's image (and each `variants[name](image)`, e.g. a trigger)
    in batches. Unreadable pairs are counted in `source.skips` by the reader."""
    import torch
    import torch.nn.functional as F

    variants = variants or {}
    class_index = {name: i for i, name in enumerate(classes)}
    keys: list[str] = []
    labels: list[int] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ["", *variants]}
    model = model.to(device).eval()

    def encode(images: list) -> np.ndarray:
        batch = torch.stack([transform(im) for im in images]).to(device)
        return F.normalize(model.encode_image(batch).float(), dim=-1).cpu().numpy()

    with torch.inference_mode():
        for batch in _batches(track(source, source.count_hint(), description), batch_size):
            keys += [p.key for p in batch]
            labels += [label_of(p.meta, class_index) for p in batch]
            parts[""].append(encode([p.image for p in batch]))
            for name, change in variants.items():
                parts[name].append(encode([change(p.image) for p in batch]))
    if not keys:
        raise ValueError(f"{source.root}: no readable pairs ({source.skips.summary()})")
    return Features(keys, np.asarray(labels, dtype=np.int64), np.concatenate(parts[""]),
                    {name: np.concatenate(parts[name]) for name in variants})


def zero_shot_top1(model, tokenizer: Callable, image_size: int, test: str, classes: str, device,
                   batch_size: int = 256) -> dict:
    """Top-1 zero-shot accuracy on a labelled pair source (pretrain's --eval-every)."""
    from ..io.pairs import open_pairs
    from ..train.augment import eval_transform
    from .templates import load_classes, load_templates

    class_set = load_classes(classes)
    was_training = model.training
    model.eval()
    weights = zero_shot_weights(text_embeddings(model, tokenizer, list(class_set.prompt_names), load_templates(),
                                                device=str(device)))
    feats = image_features(open_pairs(test), model, eval_transform(image_size), list(class_set.names),
                           batch_size=batch_size, device=str(device))
    model.train(was_training)
    known = feats.labels >= 0
    if not known.any():
        raise ValueError(f"{test}: no pair has a label among --eval-classes")
    pred = predict(zero_shot_scores(feats.image[known], weights))
    return {"zero_shot_top1": float(np.mean(pred == feats.labels[known])), "eval_pairs": int(known.sum())}


# ---- the whole evaluation -------------------------------------------------------------

@dataclass
class EvalConfig:
    """What to evaluate. The model: `checkpoint` (safeclip), or `model` + `pretrained` (open_clip
    weights; see `models.checkpoint.load_model`); it needs `test` and `classes`. `split` alone
    (no model) scores the split's detection quality only."""

    checkpoint: str | None = None
    test: str | None = None
    classes: list[str] = field(default_factory=list)  # label names: metadata, manifest classes, tables
    templates: list[str] = field(default_factory=list)
    model: str | None = None
    pretrained: str | None = None
    prompt_names: list[str] | None = None  # the words prompts use per class (default: classes)
    templates_source: str = "default"
    train: str | None = None
    manifest: str | None = None
    split: str | None = None
    truth: str | None = None
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    max_iter: int = 1000
    threads: int = 0                 # torch CPU threads; 0: every core (no data workers here)


def _class_id(name: str | None, classes: list[str], what: str) -> int:
    if name is None:
        raise ValueError(f"the manifest records no {what} (poisoned with --target-caption alone); poison with "
                         f"--target-class NAME to measure attack success, or score the split with --split")
    if name not in classes:
        raise ValueError(f"{what} {name!r} is not one of --classes ({', '.join(classes)})")
    return classes.index(name)


def _ground_truth(config: EvalConfig, result: dict) -> tuple[list[dict], list[dict]]:
    """The manifest's backdoors (with their trigger) and targets, checked against --classes."""
    from ..attacks.triggers import trigger_from_spec

    if not config.manifest:
        return [], []
    rows = read_poison_manifest(config.manifest)
    backdoors, targets = backdoors_in(rows), targets_in(rows)
    for b in backdoors:
        b["target_id"] = _class_id(b["target_class"], config.classes, f"{b['name']} target class")
        b["apply"] = trigger_from_spec(b["trigger"])
    for t in targets:
        t["adversarial_id"] = _class_id(t["adversarial_class"], config.classes, "targeted adversarial class")
    if not backdoors and not targets:
        result["warnings"].append(f"{config.manifest}: no backdoor or targeted poisons in the manifest")
    return backdoors, targets


def _attack_results(result: dict, backdoors: list[dict], targets: list[dict], test: Features, pred: np.ndarray,
                    weights: np.ndarray, classes: list[str]) -> None:
    result["backdoor"] = []
    for b in backdoors:
        triggered = predict(zero_shot_scores(test.variants[b["name"]], weights))
        result["backdoor"].append({"attack": b["name"], "trigger": b["trigger"], "target_class": b["target_class"],
                                   "poisons": b["poisons"],
                                   **attack_success(triggered, pred, test.labels, b["target_id"])})
    result["targeted"] = None
    if targets:
        result["targeted"] = targeted_success([t["source_key"] for t in targets],
                                              [t["adversarial_id"] for t in targets], test.keys, pred, classes,
                                              [t["true_class"] for t in targets])
        if result["targeted"]["missing"]:
            result["warnings"].append(f"{len(result['targeted']['missing'])} targeted target image(s) are not in "
                                      f"--test (e.g. {result['targeted']['missing'][0]}); they are not counted")


def _probe(config: EvalConfig, result: dict, model, transform: Callable, test: Features, timing: dict,
           track: Callable) -> None:
    from ..io.pairs import open_pairs

    result["linear_probe"] = None
    if not config.train:
        return
    train_source = open_pairs(config.train)
    t0 = time.perf_counter()
    train = image_features(train_source, model, transform, config.classes, batch_size=config.batch_size,
                           device=config.device, track=track, description="train images")
    timing["encode_train"] = time.perf_counter() - t0
    known_train, known_test = train.labels >= 0, test.labels >= 0
    t0 = time.perf_counter()
    result["linear_probe"] = linear_probe(train.image[known_train], train.labels[known_train],
                                          test.image[known_test], test.labels[known_test],
                                          seed=config.seed, max_iter=config.max_iter)
    timing["linear_probe"] = time.perf_counter() - t0
    result["linear_probe"].update(source=config.train, skips=train_source.skips.as_dict(),
                                  unlabelled=int(np.sum(~known_train)))
    if not result["linear_probe"]["converged"]:
        result["warnings"].append(f"linear probe did not converge in {config.max_iter} iterations")


def _detection(config: EvalConfig, result: dict) -> None:
    truth = config.truth or config.manifest
    result["detection"] = dict(split_detection(config.split, truth), split=config.split)
    if result["detection"]["unlabelled"]:
        result["warnings"].append(f"{result['detection']['unlabelled']} pair(s) of the split are not in the "
                                  f"manifest; they count as neither poison nor clean")


def evaluate_split(config: EvalConfig) -> dict:
    """Detection quality of `config.split` alone, no model: the result's `detection` part."""
    start = time.perf_counter()
    result: dict = {"checkpoint": None, "model": None, "zero_shot": None, "linear_probe": None, "backdoor": [],
                    "targeted": None, "warnings": []}
    _detection(config, result)
    result["timing_s"] = {"total": round(time.perf_counter() - start, 3)}
    return json_ready(result)


def evaluate(config: EvalConfig, track: Callable = _identity_track) -> dict:
    """Run every evaluation the inputs allow; returns the JSON-able result (see module doc)."""
    from ..io.pairs import open_pairs
    from ..models.checkpoint import load_model
    from ..models.factory import describe
    from ..train.augment import eval_transform
    from ..train.distributed import use_threads

    if config.checkpoint is None and config.pretrained is None:
        if config.model is not None:
            raise ValueError("--model needs --pretrained WEIGHTS")
        if not config.split:
            raise ValueError("nothing to evaluate: give a checkpoint (or --model + --pretrained) with --test and "
                             "--classes, or --split PART alone for its detection quality")
        if config.test or config.train or config.manifest:
            raise ValueError("--test, --train and --poison-dir/--manifest need a model: give a checkpoint or "
                             "--model + --pretrained (--split alone needs none)")
        return evaluate_split(config)
    if not config.test or not config.classes:
        raise ValueError("evaluating a model needs --test (a labelled pair source) and --classes")
    use_threads(config.threads, workers=0)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    classes = config.classes
    prompt_names = config.prompt_names or classes
    if len(prompt_names) != len(classes):
        raise ValueError("one prompt name per class is needed")
    result: dict = {"checkpoint": os.path.abspath(config.checkpoint or config.pretrained), "classes": classes,
                    "prompt_names": prompt_names,
                    "templates": {"source": config.templates_source, "count": len(config.templates),
                                  "templates": config.templates},
                    "seed": config.seed, "warnings": []}
    # Cheap checks first, so a bad manifest, source or split fails before minutes of encoding.
    backdoors, targets = _ground_truth(config, result)
    test_source = open_pairs(config.test)
    if config.train:
        open_pairs(config.train)
    truth = config.truth or config.manifest
    if config.split:
        _check_split(config.split, truth)

    loaded = load_model(config.checkpoint, model=config.model, pretrained=config.pretrained,
                        map_location=config.device)
    model, tokenizer, image_size = loaded.model.eval(), loaded.tokenizer, loaded.image_size
    result["model"] = dict(describe(loaded.config), weights=loaded.weights)
    transform = eval_transform(image_size)
    t0 = time.perf_counter()
    weights = zero_shot_weights(text_embeddings(model, tokenizer, prompt_names, config.templates,
                                                device=config.device))
    variants = {b["name"]: b["apply"] for b in backdoors}
    test = image_features(test_source, model, transform, classes, variants=variants,
                          batch_size=config.batch_size, device=config.device, track=track,
                          description="test images" + (f" (+{len(variants)} triggered)" if variants else ""))
    timing["encode_test"] = time.perf_counter() - t0
    labelled = int(np.sum(test.labels >= 0))
    result["test"] = {"source": config.test, "pairs": len(test.keys), "labelled": labelled,
                      "skips": test_source.skips.as_dict()}
    if labelled == 0:
        raise ValueError(f"{config.test}: no test pair has a class (metadata `class_name` in --classes or an "
                         f"integer `label` below {len(classes)})")
    if labelled < len(test.keys):
        result["warnings"].append(f"{len(test.keys) - labelled} test pair(s) have no known class and are left "
                                  f"out of accuracy and attack success")
    scores = zero_shot_scores(test.image, weights)
    pred = predict(scores)
    result["zero_shot"] = zero_shot_report(scores, test.labels, classes)
    _attack_results(result, backdoors, targets, test, pred, weights, classes)
    _probe(config, result, model, transform, test, timing, track)
    result["detection"] = None
    if config.split:
        _detection(config, result)
    timing["total"] = time.perf_counter() - start
    result["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    return json_ready(result)


def json_ready(value):
    """Plain Python values for json.dumps: numpy scalars unwrapped, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return None if not math.isfinite(float(value)) else float(value)
    return value
