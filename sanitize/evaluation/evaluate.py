"""Evaluation: does the trained model classify well, and did the attacks work?

Pure metric functions on arrays (the tests build the arrays by hand):
  zero-shot     class weights = mean of a class's L2-normalised prompt embeddings,
                renormalised (CLIP's prompt ensembling); top-1/top-k and per-class
                accuracy of `image_features @ weights.T`.
  linear probe  scikit-learn logistic regression on standardised frozen image
                features of a train source, accuracy on the test source.
  backdoor ASR  share of triggered test images *not of the target class* that the
                zero-shot classifier puts in the target class, beside the same share
                without the trigger (natural confusion), so the lift is the attack's.
  targeted      for each TDPA target image, whether it is classified as its
                adversarial class: x of N, with the list.
  detection     per attack, recall and precision of its poisons in a split's risky
                set, AUROC of `p_clean` for poison vs clean, and the rank of the first
                poison in the `p_clean` ordering — the largest safe share that would
                still hold no poison.

Thin I/O around them: image features of a pair source with a checkpoint (batched,
optionally with a backdoor trigger applied exactly as `safeclip poison` does), the
poison manifest, and a split joined to its ground truth through `sanitize.query`.
`evaluate()` runs whichever parts its inputs allow and returns one JSON-able dict.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")
BACKDOOR_ATTACKS = ("badnet", "blended", "wanet", "label-consistent")
MANIFEST_FILE = "manifest.parquet"


# ---- zero-shot ------------------------------------------------------------------------

def _normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def zero_shot_weights(text_emb: np.ndarray) -> np.ndarray:
    """(C, T, D) prompt embeddings (class x template) -> (C, D) class weights: each prompt
    normalised, averaged over templates, renormalised."""
    if text_emb.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) text embeddings, got shape {text_emb.shape}")
    return _normalise(_normalise(text_emb.astype(np.float64)).mean(axis=1)).astype(np.float32)


def zero_shot_scores(image_emb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) cosine scores of normalised image features against class weights."""
    return _normalise(image_emb.astype(np.float32)) @ weights.T


def predict(scores: np.ndarray) -> np.ndarray:
    """Top-1 class per row (the first on ties)."""
    return np.argmax(scores, axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest scores (k is capped at the class count)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(count per class, accuracy per class — NaN for a class with no test image)."""
    counts = np.bincount(labels, minlength=n_classes)
    correct = np.bincount(labels[pred == labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    return counts, accuracy


def zero_shot_report(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 and per-class accuracy over the rows with a known label (label >= 0)."""
    known = labels >= 0
    scores, labels = scores[known], labels[known]
    pred = predict(scores)
    counts, accuracy = per_class_accuracy(pred, labels, len(classes))
    return {"n": int(len(labels)), "top1": topk_accuracy(scores, labels, 1),
            "top5": topk_accuracy(scores, labels, 5), "top5_k": min(5, len(classes)),
            "per_class": [{"class": name, "n": int(n), "accuracy": float(a)}
                          for name, n, a in zip(classes, counts, accuracy)]}


# ---- linear probe ---------------------------------------------------------------------

def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 seed: int = 0, max_iter: int = 1000, C: float = 1.0) -> dict:
    """Logistic regression on standardised frozen features; accuracy on the test features.
    Standardising makes one C and one iteration budget work for any embedding scale."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe: the train source needs labelled images of at least 2 classes")
    if len(test_y) == 0:
        raise ValueError("linear probe: no labelled test image")
    probe = make_pipeline(StandardScaler(),
                          LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as `converged` instead
        probe.fit(train_x, train_y)
    pred = probe.predict(test_x)
    n_iter = int(np.max(probe[-1].n_iter_))
    return {"accuracy": float(np.mean(pred == test_y)), "train_n": int(len(train_y)), "test_n": int(len(test_y)),
            "C": C, "max_iter": max_iter, "n_iter": n_iter, "converged": n_iter < max_iter, "seed": seed}


# ---- attacks --------------------------------------------------------------------------

def attack_success(pred_triggered: np.ndarray, pred_clean: np.ndarray, labels: np.ndarray, target: int) -> dict:
    """Backdoor ASR: share of triggered images whose true class is known and is not the
    target that are classified as the target; `no_trigger` is the same share on the
    clean images (natural confusion); `lift` is the difference — the attack's effect."""
    eligible = (labels >= 0) & (labels != target)
    n = int(eligible.sum())
    if n == 0:
        return {"n": 0, "asr": None, "no_trigger": None, "lift": None,
                "excluded_target_class": int(np.sum(labels == target))}
    asr = float(np.mean(pred_triggered[eligible] == target))
    base = float(np.mean(pred_clean[eligible] == target))
    return {"n": n, "asr": asr, "no_trigger": base, "lift": asr - base,
            "excluded_target_class": int(np.sum(labels == target))}


def targeted_success(target_keys: list[str], adversarial: list[int], keys: list[str], pred: np.ndarray,
                     classes: list[str], true_class: list[str | None] | None = None) -> dict:
    """TDPA success: each target image counts when classified as its adversarial class.
    Targets whose key is not in the evaluated set are listed as missing, not counted."""
    where = {k: i for i, k in enumerate(keys)}
    rows, missing = [], []
    for j, (key, adv) in enumerate(zip(target_keys, adversarial)):
        if key not in where:
            missing.append(key)
            continue
        predicted = int(pred[where[key]])
        rows.append({"key": key, "true_class": true_class[j] if true_class else None,
                     "adversarial_class": classes[adv], "predicted": classes[predicted],
                     "success": predicted == adv})
    success = sum(r["success"] for r in rows)
    return {"success": success, "total": len(rows), "rate": success / len(rows) if rows else None,
            "targets": rows, "missing": missing}


# ---- detection quality of a split -----------------------------------------------------

def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` for positive vs negative rows (None when one side is empty)."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def detection_metrics(kind: np.ndarray, attack: np.ndarray, risky: np.ndarray, p_clean: np.ndarray,
                      rank: np.ndarray) -> dict:
    """How well a split separates poisons from clean pairs.

    kind: 'clean' | 'poison' | 'noise' | None (not in the manifest); attack: the poison's
    attack; risky: in the risky partition; rank: the split's order, 0 = most clean.
    Per attack (and all poisons together; noise as its own row): pairs, how many are in
    the risky set (recall) and what share of the risky set they are (precision), AUROC of
    1 - p_clean against clean pairs, and `first_rank` — how many pairs rank above the
    first of them, i.e. the largest safe set that holds none (`poison_free_share`)."""
    kind = np.asarray(kind, dtype=object)
    attack = np.asarray(attack, dtype=object)
    risky = np.asarray(risky, dtype=bool)
    p_clean = np.asarray(p_clean, dtype=np.float64)
    rank = np.asarray(rank, dtype=np.int64)
    n = len(kind)
    n_risky = int(risky.sum())
    clean = kind == "clean"
    poison = kind == "poison"
    risk_score = 1.0 - p_clean

    def row(name: str, members: np.ndarray) -> dict:
        total = int(members.sum())
        in_risky = int((members & risky).sum())
        first = int(rank[members].min()) if total else None
        above = int(np.sum(rank < first)) if total else None  # robust to gaps in the rank column
        return {"name": name, "total": total, "in_risky": in_risky, "in_safe": total - in_risky,
                "recall": in_risky / total if total else None,
                "precision": in_risky / n_risky if n_risky else None,
                "auroc": auroc(members[members | clean], risk_score[members | clean]) if total else None,
                "first_rank": above,
                "poison_free_share": above / n if total and n else None}

    attack_name = np.array([a if a is not None else "poison" for a in attack], dtype=object)
    rows = [row(name, poison & (attack_name == name)) for name in sorted(set(attack_name[poison]))]
    everything = row("all poisons", poison)
    if len(rows) != 1:
        rows.append(everything)
    if (kind == "noise").any():
        rows.append(row("noise", kind == "noise"))
    safe_share = (n - n_risky) / n if n else None
    return {"n": n, "safe": n - n_risky, "risky": n_risky, "safe_share": safe_share,
            "clean": int(clean.sum()), "poisons": int(poison.sum()), "unlabelled": sum(k is None for k in kind),
            "auroc": everything["auroc"], "first_poison_rank": everything["first_rank"],
            "poison_free_share": everything["poison_free_share"],
            "headroom": (everything["poison_free_share"] - safe_share
                         if everything["poison_free_share"] is not None and safe_share is not None else None),
            "rows": rows}


# ---- ground truth ---------------------------------------------------------------------

def manifest_path(poison_dir: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> str:
    """The manifest file from --poison-dir DIR (DIR/manifest.parquet) or --manifest PATH."""
    if poison_dir is not None and manifest is not None:
        raise ValueError("give --poison-dir or --manifest, not both")
    path = Path(manifest) if manifest is not None else Path(poison_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no poison manifest (written by `safeclip poison`)")
    return str(path)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise ValueError(f"{path}: not a readable Parquet manifest ({str(exc).splitlines()[0][:160]})")
    needed = {"key", "attack", "kind", "target_class", "source_key", "trigger"}
    missing = needed - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a poison manifest (missing column(s) {', '.join(sorted(missing))})")
    optional = {"true_class", "run"} & set(table.column_names)
    return table.select(sorted(needed | optional)).to_pylist()


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


# ---- the whole evaluation -------------------------------------------------------------

@dataclass
class EvalConfig:
    checkpoint: str
    test: str
    classes: list[str]               # label names: metadata, manifest classes, tables
    templates: list[str]
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


def _class_id(name: str | None, classes: list[str], what: str) -> int:
    if name not in classes:
        raise ValueError(f"{what} {name!r} is not one of --classes ({', '.join(classes)})")
    return classes.index(name)


def evaluate(config: EvalConfig, track: Callable = _identity_track) -> dict:
    """Run every evaluation the inputs allow; returns the JSON-able result (see module doc)."""
    from ..train.augment import eval_transform
    from ..models.checkpoint import load_checkpoint
    from ..models.factory import describe
    from ..io.pairs import open_pairs
    from ..attacks.triggers import trigger_from_spec

    timing: dict[str, float] = {}
    start = time.perf_counter()
    classes = config.classes
    prompt_names = config.prompt_names or classes
    if len(prompt_names) != len(classes):
        raise ValueError("one prompt name per class is needed")
    result: dict = {"checkpoint": os.path.abspath(config.checkpoint), "classes": classes,
                    "prompt_names": prompt_names,
                    "templates": {"source": config.templates_source, "count": len(config.templates),
                                  "templates": config.templates},
                    "seed": config.seed, "warnings": []}

    # Cheap checks first, so a bad manifest or split fails before minutes of encoding.
    backdoors, targets = [], []
    if config.manifest:
        rows = read_manifest(config.manifest)
        backdoors, targets = backdoors_in(rows), targets_in(rows)
        for b in backdoors:
            b["target_id"] = _class_id(b["target_class"], classes, f"{b['name']} target class")
            b["apply"] = trigger_from_spec(b["trigger"])
        for t in targets:
            t["adversarial_id"] = _class_id(t["adversarial_class"], classes, "targeted adversarial class")
        if not backdoors and not targets:
            result["warnings"].append(f"{config.manifest}: no backdoor or targeted poisons in the manifest")
    test_source = open_pairs(config.test)
    train_source = open_pairs(config.train) if config.train else None
    truth = config.truth or config.manifest
    if config.split:
        _check_split(config.split, truth)

    model, tokenizer, image_size, model_config, _state = load_checkpoint(config.checkpoint, config.device)
    model.eval()
    result["model"] = describe(model_config)
    transform = eval_transform(image_size)

    t0 = time.perf_counter()
    weights = zero_shot_weights(text_embeddings(model, tokenizer, prompt_names, config.templates,
                                                device=config.device))
    variants = {b["name"]: b["apply"] for b in backdoors}
    test = image_features(test_source, model, transform, classes, variants=variants,
                          batch_size=config.batch_size, device=config.device, track=track,
                          description="test images" + (f" (+{len(variants)} triggered)" if variants else ""))
    timing["encode_test"] = time.perf_counter() - t0
    result["test"] = {"source": config.test, "pairs": len(test.keys), "labelled": int(np.sum(test.labels >= 0)),
                      "skips": test_source.skips.as_dict()}
    if result["test"]["labelled"] == 0:
        raise ValueError(f"{config.test}: no test pair has a class (metadata `class_name` in --classes or an "
                         f"integer `label` below {len(classes)})")
    if result["test"]["labelled"] < len(test.keys):
        result["warnings"].append(f"{len(test.keys) - result['test']['labelled']} test pair(s) have no known "
                                  f"class and are left out of accuracy and attack success")

    scores = zero_shot_scores(test.image, weights)
    pred = predict(scores)
    result["zero_shot"] = zero_shot_report(scores, test.labels, classes)

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

    result["linear_probe"] = None
    if train_source is not None:
        t0 = time.perf_counter()
        train = image_features(train_source, model, transform, classes, batch_size=config.batch_size,
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

    result["detection"] = None
    if config.split:
        result["detection"] = detection_metrics(**read_split_truth(config.split, truth))
        result["detection"].update(split=config.split)
        if result["detection"]["unlabelled"]:
            result["warnings"].append(f"{result['detection']['unlabelled']} pair(s) of the split are not in the "
                                      f"manifest; they count as neither poison nor clean")
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
