"""Evaluation metrics as pure functions of arrays (the tests build the arrays by hand).

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
                still hold no poison. One function for eval, report, demo and benchmarks.
"""

from __future__ import annotations

import warnings

import numpy as np


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
        return {"name": name, "kind": "noise" if name == "noise" else "poison", "total": total,
                "in_risky": in_risky, "in_safe": total - in_risky,
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
