"""Synthetic embedding folders with the schema `safeclip embed` writes (for tests).

Each shard becomes EMB/<name>.parquet with key, caption, url, label, class_name,
image_emb / text_emb (unit vectors whose cosine is the given similarity) and
similarity; EMB/embed.json records the source like the real command does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def unit_pairs(similarity: np.ndarray, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors u, t with <u, t> = similarity row-wise."""
    u = rng.normal(size=(similarity.size, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(similarity.size, dim))
    v -= (v * u).sum(1, keepdims=True) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    s = similarity[:, None]
    return u, s * u + np.sqrt(np.clip(1 - s * s, 0, None)) * v


def mixture_similarities(n: int, rng: np.random.Generator, clean_share: float = 0.8) -> np.ndarray:
    """Similarities from two well-separated bumps, like a warmed-up model's."""
    clean = rng.random(n) < clean_share
    sims = np.where(clean, rng.normal(0.30, 0.05, n), rng.normal(0.05, 0.04, n))
    return np.clip(sims, -0.99, 0.99).astype(np.float32)


def write_embed_manifest(emb: Path, source: str | None = None, source_format: str = "webdataset") -> None:
    """EMB/embed.json for the Parquet files already in `emb` (what a finished `safeclip embed` leaves)."""
    files = sorted(p for p in emb.glob("*.parquet") if not p.name.startswith("."))
    first = pq.ParquetFile(files[0]).schema_arrow if files else None
    dim = first.field("image_emb").type.list_size if first is not None and "image_emb" in first.names else 0
    info = {"checkpoint": "synthetic.pt", "source": source, "source_format": source_format, "dim": dim,
            "dtype": "float16", "count": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
            "shards": [f.name for f in files]}
    (emb / "embed.json").write_text(json.dumps(info))


def write_emb(emb: Path, shards: dict[str, np.ndarray], dim: int = 8, dtype=np.float16,
              keys: dict[str, list[str]] | None = None, source: str | None = None,
              source_format: str = "webdataset", seed: int = 0, with_url: bool = True,
              captions: dict[str, list[str]] | None = None,
              vectors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write one Parquet file per shard name -> similarities, plus embed.json. `vectors`:
    the image and text embeddings of a shard, when the test needs their geometry too."""
    rng = np.random.default_rng(seed)
    emb.mkdir(parents=True, exist_ok=True)
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    for index, (name, sims) in enumerate(shards.items()):
        sims = np.asarray(sims, dtype=np.float32)
        n = sims.size
        shard_keys = keys[name] if keys else [f"{index:05d}{i:04d}" for i in range(n)]
        u, t = vectors[name] if vectors else unit_pairs(np.nan_to_num(sims.astype(np.float64)), dim, rng)
        dim = u.shape[1]
        labels = rng.integers(0, 10, n)
        columns = {
            "key": pa.array(shard_keys, pa.string()),
            "caption": pa.array(captions[name] if captions else
                                [f"a photo of item {k} of class {c}" for k, c in zip(shard_keys, labels)]),
        }
        if with_url:
            columns["url"] = pa.array([None if i % 7 == 0 else f"http://x/{k}.jpg"
                                       for i, k in enumerate(shard_keys)], pa.string())
        columns.update({
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array([f"class{c}" for c in labels]),
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(u.astype(dtype).reshape(-1), value_type), dim),
            "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(t.astype(dtype).reshape(-1), value_type), dim),
            "similarity": pa.array(sims, pa.float32()),
        })
        pq.write_table(pa.table(columns), emb / f"{name}.parquet")
    info = {"checkpoint": "synthetic.pt", "source": source, "source_format": source_format, "dim": dim,
            "dtype": np.dtype(dtype).name, "count": int(sum(np.size(s) for s in shards.values())),
            "shards": [f"{name}.parquet" for name in shards]}
    (emb / "embed.json").write_text(json.dumps(info))
    return emb
