"""Split embedded pairs into a safe and a risky partition (SafeCLIP step 3).

Reads the Parquet files `safeclip embed` writes (one per input shard), fits a
2-component Gaussian mixture to the similarities, scores every pair with
`p_clean` (posterior of the high-mean component), ranks all pairs and routes them
to `PART/safe/` and `PART/risky/` by a ratio schedule.

Memory stays bounded by two passes that never touch the embeddings (global ranking):
  1. read only `key` and `similarity` of every file -> fit, posteriors, one
     global ranking (a few float64/int64 arrays of N, plus the keys in Arrow);
  2. stream every file again in batches (key, caption, url, similarity) and write
     each row to the safe or risky writer of its shard, by its global rank.

Schedule grammar (SPEC), documented in docs/split.md:
  safeclip[:threshold=T,step=S,cap=C,r0=R]
      SafeCLIP's schedule. Epoch 0: safe = p_clean >= T (default 0.9); its share is
      the start ratio r0. Epoch k >= 1: safe = top min(C, r0 + k*S) of all pairs by
      p_clean (defaults S=0.01, C=0.85). r0 comes from R if given, else from the
      split.json of `previous` (any earlier split of the run; r0 is carried along),
      else from this fit at p_clean >= T.
  fraction:F    safe = top F of all pairs by p_clean, at every epoch.
  threshold:T   safe = p_clean >= T, at every epoch.
  estimate[:margin=M,cap=C,floor=L]
      safe = top (1 - w - M) of all pairs by p_clean, within [L, C], where w is the
      mismatched share estimated from a shuffled-caption null (defenses/mismatch.py).
Ties in p_clean are broken by the unrounded log-odds, then similarity (higher
first), then key (ascending), then input order: the ranking is deterministic.

Ranking (`ranking=`): "global" (the paper's, the default) takes the top n_safe of all
pairs; "balanced" shares the same n_safe out over faiss k-means clusters of the
embeddings and takes the top share inside each (sanitize/defenses/balance.py; it streams the
embedding columns twice more, keeping one small int per row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..defenses.duplicates import find_groups, groups_by_key, one_per_group, write_groups
from ..defenses.gmm import clean_log_odds, fit_mixture, posterior_from_log_odds, separation, split_warnings
from ..defenses.mismatch import estimate_from_files
from ..defenses.schedule import Schedule, parse_schedule, plan_split
from ..io.artifacts import PARTITIONS, Embeddings, Split, SplitManifest, check_unique_keys
from ..io.shards import remove_stale_temps, temp_path, write_error

T = TypeVar("T")
DEFAULT_FIT_SAMPLE = 1_000_000
BATCH_ROWS = 65_536

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("similarity", pa.float32()),
    ("p_clean", pa.float64()),
    ("rank", pa.int64()),
    ("partition", pa.string()),
    ("epoch", pa.int32()),
    ("ratio", pa.float64()),
])


def read_previous_r0(part: str | os.PathLike) -> tuple[float, str]:
    """The start ratio recorded in an earlier split's split.json."""
    manifest = Split(part).manifest()
    if manifest.r0 is None:
        raise ValueError(f"{part}: that split has no start ratio r0 (it did not use the safeclip schedule)")
    return float(manifest.r0), str(part)


# ---- reading embedding files -----------------------------------------------------

@dataclass(frozen=True)
class EmbFile:
    path: str
    name: str       # file stem = the input shard's name
    rows: int
    has_url: bool


def list_emb_files(emb: str | os.PathLike) -> list[EmbFile]:
    """The embedding files of a finished EMB folder (embed.json and its files agree),
    each checked for the columns the split reads."""
    if not Path(emb).is_dir():
        raise FileNotFoundError(f"{emb}: no such folder of embedding files")
    files = Embeddings(emb).files()
    if not files:
        Embeddings(emb).check_complete()  # says "unfinished" when a run has started
        raise FileNotFoundError(f"{emb}: no embedding files (*.parquet); run `safeclip embed` first")
    out = []
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a cut or garbled file
            raise ValueError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
        schema = meta.schema_arrow
        missing = [c for c in ("key", "caption", "similarity") if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; is this an embed output?")
        _check_column_types(path, schema)
        out.append(EmbFile(str(path), path.stem, meta.metadata.num_rows, "url" in schema.names))
    Embeddings(emb).check_complete()  # a half-written folder is never read as a whole one
    return out


def _check_column_types(path: Path, schema: pa.Schema) -> None:
    """One number per pair in `similarity`, text in `key` and `caption`."""
    kinds = {"similarity": (pa.types.is_floating, pa.types.is_integer, pa.types.is_null),
             "key": (pa.types.is_string, pa.types.is_large_string),
             "caption": (pa.types.is_string, pa.types.is_large_string, pa.types.is_null)}
    for name, accepted in kinds.items():
        kind = schema.field(name).type
        if not any(test(kind) for test in accepted):
            what = "a number" if name == "similarity" else "text"
            raise ValueError(f"{path}: column {name} is {kind}, not {what} per pair; is this an embed output?")


def _similarities_and_keys(files: list[EmbFile], track) -> tuple[np.ndarray, pa.ChunkedArray]:
    sims, keys = [], []
    for f in track(files, len(files), "reading similarities"):
        table = pq.read_table(f.path, columns=["key", "similarity"])
        sim = table.column("similarity").cast(pa.float64())
        sims.append(pc.fill_null(sim, float("nan")).to_numpy())
        keys.extend(table.column("key").cast(pa.string()).chunks)
    similarity = np.concatenate(sims) if sims else np.empty(0)
    return similarity, pa.chunked_array(keys, type=pa.string())


# ---- ranking ----------------------------------------------------------------------

def _identity_track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    return iter(items)


@dataclass
class RankInputs:
    """What a ranking strategy may use. `files` lets a strategy read the embeddings
    (the balanced one clusters them); `n_safe` is the schedule's safe count, which a
    strategy must place first; `options` are the strategy's parsed options."""

    log_odds: np.ndarray        # float64, -inf for pairs with no usable similarity
    similarity: np.ndarray      # float64, -inf where missing
    keys: pa.ChunkedArray
    files: list[EmbFile]
    seed: int = 0
    n_safe: int = 0
    options: Any = None
    track: Callable = _identity_track


@dataclass
class Ranked:
    """A strategy's answer: the row order (most clean first; the first n_safe rows are
    the safe set) and what it adds to split.json."""

    order: np.ndarray
    manifest: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def rank_global(inputs: RankInputs) -> np.ndarray:
    """Row indices, most clean first: log-odds desc, similarity desc, key asc, input order."""
    table = pa.table({"lo": inputs.log_odds, "sim": inputs.similarity, "key": inputs.keys})
    order = pc.sort_indices(table, sort_keys=[("lo", "descending"), ("sim", "descending"),
                                              ("key", "ascending")])
    return order.to_numpy().astype(np.int64, copy=False)


def _global(inputs: RankInputs) -> Ranked:
    return Ranked(rank_global(inputs))


def _balanced(inputs: RankInputs) -> Ranked:
    """Spherical k-means clusters of the embeddings; the safe count is shared out over
    the clusters in proportion to their size, each filled by its own best p_clean
    (sanitize/defenses/balance.py). Ties and the order inside each part follow rank_global."""
    from ..defenses.balance import FEW_POINTS, balanced_order, cluster_rows

    opts = inputs.options
    eligible = np.isfinite(inputs.log_odds)
    clustering = cluster_rows([f.path for f in inputs.files], inputs.log_odds.size, eligible, opts,
                              seed=inputs.seed, track=inputs.track)
    global_order = rank_global(inputs)
    order, quota = balanced_order(global_order, clustering.labels, opts.clusters, inputs.n_safe)
    labels = clustering.labels
    sizes = np.bincount(labels[labels >= 0], minlength=opts.clusters)
    # What the paper's global cut would have given each cluster: shows the starvation.
    top = labels[global_order[:inputs.n_safe]]
    global_safe = np.bincount(top[top >= 0], minlength=opts.clusters)
    in_both = int(np.count_nonzero(np.isin(order[:inputs.n_safe], global_order[:inputs.n_safe],
                                           assume_unique=True)))
    warnings = []
    if clustering.n_train < FEW_POINTS * opts.clusters:
        warnings.append(f"k-means trained on {clustering.n_train} pairs for {opts.clusters} clusters (fewer "
                        f"than {FEW_POINTS} per cluster); consider fewer --clusters")
    return Ranked(order, {"balance": {
        "clusters": opts.clusters,
        "cluster_on": opts.cluster_on,
        "kmeans": "faiss spherical k-means",
        "niter": opts.niter,
        "sample": clustering.n_train,
        "sample_max": opts.sample,
        "seed": inputs.seed,
        "objective": clustering.objective,
        "cluster_sizes": sizes.tolist(),
        "cluster_safe": quota.tolist(),
        "cluster_safe_global": global_safe.tolist(),
        "safe_also_in_global_cut": in_both,
    }}, warnings)


def _no_options(options: Mapping | None) -> None:
    return None


def _balanced_options(options: Mapping | None):
    from ..defenses.balance import BalanceOptions

    return BalanceOptions.from_mapping(options)


# name -> (strategy, options parser). Parsers run before any output is touched.
RANKINGS: dict[str, tuple[Callable[[RankInputs], Ranked], Callable[[Mapping | None], Any]]] = {
    "global": (_global, _no_options),
    "balanced": (_balanced, _balanced_options),
}


# ---- the split --------------------------------------------------------------------

@dataclass
class SplitResult:
    manifest: SplitManifest
    out: str
    warnings: list[str] = field(default_factory=list)


def _prepare_out(out: Split, force: bool) -> None:
    if out.is_finished() and not force:
        raise FileExistsError(f"{out.root}: already holds a split ({Split.MANIFEST}); use --force to replace it")
    for part in PARTITIONS:
        out.partition_dir(part).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.partition_dir(part))  # left by a split killed mid-write
    # The manifest goes first so a half-rewritten folder never looks complete.
    out.manifest_path.unlink(missing_ok=True)
    out.groups_path.unlink(missing_ok=True)
    for part in PARTITIONS:
        for stale in out.partition_dir(part).glob("*.parquet"):
            stale.unlink()


def _output_table(batch: pa.RecordBatch, has_url: bool, p_clean: np.ndarray, rank: np.ndarray,
                  partition: str, epoch: int, ratio: float) -> pa.Table:
    """Rows of one partition (already filtered) in the output schema."""
    n = batch.num_rows
    url = batch.column("url").cast(pa.string()) if has_url else pa.nulls(n, pa.string())
    return pa.Table.from_arrays([
        batch.column("key").cast(pa.string()),
        batch.column("caption").cast(pa.string()),
        url,
        batch.column("similarity").cast(pa.float32()),
        pa.array(p_clean, pa.float64()),
        pa.array(rank, pa.int64()),
        pa.repeat(partition, n).cast(pa.string()),
        pa.array(np.full(n, epoch, np.int32)),
        pa.array(np.full(n, ratio, np.float64)),
    ], schema=OUTPUT_SCHEMA)


def _write_partitions(files: list[EmbFile], out: Path, p_clean: np.ndarray, rank: np.ndarray, n_safe: int,
                      epoch: int, ratio: float, track) -> None:
    start = 0
    for f in track(files, len(files), "writing partitions"):
        columns = ["key", "caption", "similarity"] + (["url"] if f.has_url else [])
        tmp = {p: temp_path(out / p / f"{f.name}.parquet") for p in PARTITIONS}
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            for name in PARTITIONS:
                writers[name] = pq.ParquetWriter(tmp[name], OUTPUT_SCHEMA)
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                stop = start + batch.num_rows
                r, p = rank[start:stop], p_clean[start:stop]
                safe = r < n_safe
                for name, mask in (("safe", safe), ("risky", ~safe)):
                    rows = batch.filter(pa.array(mask))
                    writers[name].write_table(_output_table(rows, f.has_url, p[mask], r[mask], name, epoch, ratio))
                start = stop
            for name in PARTITIONS:
                writers.pop(name).close()
        except BaseException as exc:  # a full disk included: no temporary file stays behind
            for name in PARTITIONS:
                if name in writers:
                    with contextlib.suppress(Exception):
                        writers[name].close()
                tmp[name].unlink(missing_ok=True)
            named = write_error(exc, f"{out}/{{safe,risky}}/{f.name}.parquet")  # which files could not be written
            if named is not exc:
                raise named from exc
            raise
        for p in PARTITIONS:
            os.replace(tmp[p], out / p / f"{f.name}.parquet")
    if start != rank.size:
        raise ValueError(f"embedding files changed while splitting ({start} rows read, {rank.size} expected)")


def draw_fit_sample(similarity: np.ndarray, finite: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The finite similarities, or a seeded uniform sample of `size` of them (in input order)."""
    usable = similarity if finite.all() else similarity[finite]
    if usable.size <= size:
        return usable
    pick = np.random.default_rng(seed).choice(usable.size, size=size, replace=False)
    return usable[np.sort(pick)]


@dataclass
class _Ranking:
    """One fit and ranking of every pair: what the partitions and the manifest are made from."""

    similarity: np.ndarray
    finite: np.ndarray
    p_clean: np.ndarray
    rank: np.ndarray          # position of each row in the ranking, 0 = most clean
    safe_rows: np.ndarray
    n_safe: int
    plan: Any
    mixture: Any
    fit_sample: int
    extra: dict
    warnings: list[str]
    timing: dict
    groups: Any = None        # the near-duplicate groups the ranking used, when it grouped
    keys: Any = None          # every pair's key in row order (pa.ChunkedArray)


def _fit_and_rank(files: list[EmbFile], schedule: Schedule, epoch: int, fit_sample: int, seed: int,
                  previous_r0, previous_source, strategy, options, track, dedup: float | None = None,
                  groups_from: Path | None = None) -> _Ranking:
    """Read the similarities, fit the mixture, apply the schedule and rank (pass 1 of 2)."""
    t0 = time.perf_counter()
    warnings: list[str] = []
    similarity, keys = _similarities_and_keys(files, track)
    if pc.count_distinct(keys).as_py() != len(keys):  # then name them (reads the keys again)
        check_unique_keys([f.path for f in files], Path(files[0].path).parent,
                          "embed the source again with --duplicate-keys rename --force")
    n = similarity.size
    finite = np.isfinite(similarity)
    n_bad = int(n - np.count_nonzero(finite))
    if n_bad:
        warnings.append(f"{n_bad} pairs without a finite similarity were put in the risky set")
    t_read = time.perf_counter()

    sample = draw_fit_sample(similarity, finite, fit_sample, seed)
    mixture = fit_mixture(sample, seed=seed)
    t_fit = time.perf_counter()

    log_odds = clean_log_odds(similarity, mixture)
    if n_bad:
        log_odds[~finite] = -np.inf
    p_clean = posterior_from_log_odds(log_odds)
    mismatched = None
    if schedule.kind == "estimate":  # reads a sample's embeddings: only when the schedule needs it
        mismatched = estimate_from_files([f.path for f in files], [f.rows for f in files], similarity, seed=seed)
    plan = plan_split(schedule, epoch, p_clean, previous_r0, previous_source,
                      mismatched=mismatched.share if mismatched else None)
    if plan.n_safe > n - n_bad:  # fraction:1 or threshold:0 must not make unscored pairs safe
        plan = dataclasses.replace(plan, n_safe=n - n_bad)
    ranked = strategy(RankInputs(log_odds, np.where(finite, similarity, -np.inf), keys, files, seed,
                                 plan.n_safe, options, track))
    warnings.extend(ranked.warnings)
    order, extra = ranked.order, dict(ranked.manifest)
    if mismatched is not None:
        extra["mismatched"] = mismatched.as_dict()
    groups = None
    if dedup:  # at most one pair of each near-duplicate image group in the safe set (defenses/duplicates.py)
        groups = (groups_by_key(groups_from, keys, dedup) if groups_from is not None
                  else find_groups([f.path for f in files], n, dedup, seed=seed, track=track))
        order, moved = one_per_group(order, groups.labels, plan.n_safe)
        extra["dedup"] = {**groups.summary(), "left_safe_set": moved,
                          **({"groups_from": str(groups_from)} if groups_from is not None else {})}
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    timing = {"read": t_read - t0, "fit": t_fit - t_read, "rank": time.perf_counter() - t_fit}
    return _Ranking(similarity, finite, p_clean, rank, order[:plan.n_safe], plan.n_safe, plan, mixture,
                    int(sample.size), extra, warnings, timing, groups, keys)


def _manifest(emb: str | os.PathLike, files: list[EmbFile], schedule: Schedule, epoch: int, seed: int,
              ranking: str, r: _Ranking, warnings: list[str], timing: dict) -> SplitManifest:
    n, n_safe = r.similarity.size, r.n_safe
    if n_safe == 0 and n:
        warnings.append("no pair is safe (none reached the schedule's cut); is the model warmed up?")
    quality = separation(r.mixture)
    warnings.extend(split_warnings(quality, n_safe / n if n_safe else None))
    below_at = r.mixture.monotone_below
    if below_at is not None and np.any(r.similarity[r.finite] < below_at):
        below = int(np.count_nonzero(r.similarity[r.finite] < below_at))
        warnings.append(f"{below} pairs lie below similarity {below_at:.4f}, where p_clean "
                        "rises again (the clean component is wider); see docs/split.md")
    info = Embeddings(emb).info()
    return SplitManifest(
        epoch=epoch, schedule=schedule.as_dict(), ratio=r.plan.ratio, r0=r.plan.r0, r0_source=r.plan.r0_source,
        threshold=schedule.threshold if schedule.kind in ("safeclip", "threshold") else None,
        p_clean_cutoff=float(r.p_clean[r.safe_rows].min()) if n_safe else None,
        similarity_cutoff=float(r.similarity[r.safe_rows].min()) if n_safe else None,
        counts={"total": n, "safe": n_safe, "risky": n - n_safe, "no_similarity": int(n - r.finite.sum()),
                "safe_share": n_safe / n if n else 0.0},
        mixture=r.mixture.as_dict(), separation=quality, fit_sample=r.fit_sample, seed=seed, ranking=ranking,
        emb=os.path.abspath(emb), source=info.get("source"), source_format=info.get("source_format"),
        checkpoint=info.get("checkpoint"), duplicate_keys=info.get("duplicate_keys") or "error",
        input_files=[{"name": os.path.basename(f.path), "rows": f.rows} for f in files],
        warnings=warnings, timing_s={k: round(v, 3) for k, v in timing.items()}, extra=r.extra)


def split(emb: str | os.PathLike, out: str | os.PathLike, schedule: Schedule | str, epoch: int = 0,
          fit_sample: int = DEFAULT_FIT_SAMPLE, seed: int = 0, previous: str | os.PathLike | None = None,
          ranking: str = "global", ranking_options: Mapping | None = None, force: bool = False,
          track: Callable[[Iterable, int | None, str], Iterable] = _identity_track,
          dedup: float | None = None, dedup_groups: str | os.PathLike | None = None) -> SplitResult:
    """Fit, rank and write both partitions plus PART/split.json (written last). `dedup`: the
    near-duplicate threshold tau; the safe set then holds at most one pair of each group of
    near-identical images (defenses/duplicates.py), and PART/groups.parquet keeps the groups.
    `dedup_groups`: an earlier split folder whose groups to reuse instead of finding them."""
    t0 = time.perf_counter()
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule)
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    strategy, parse_options = RANKINGS[ranking]
    options = parse_options(ranking_options)
    if fit_sample < 2:
        raise ValueError(f"--fit-sample must be at least 2, got {fit_sample}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    previous_r0, previous_source = (read_previous_r0(previous) if previous is not None
                                    and schedule.kind == "safeclip" and epoch > 0 else (None, None))
    groups_from = None
    if dedup and dedup_groups is not None:
        groups_from = Split(dedup_groups).groups_path
        if Path(dedup_groups).resolve() == Path(out).resolve():
            raise ValueError("the groups to reuse must come from another split folder than --out")
        if not groups_from.exists():
            raise ValueError(f"{dedup_groups}: no {Split.GROUPS} to reuse (split it with --dedup-tau first)")
    files = list_emb_files(emb)
    folder = Split(out)
    _prepare_out(folder, force)
    warnings: list[str] = []
    if previous is not None and previous_r0 is None:
        warnings.append("--previous is only used by the safeclip schedule at epoch >= 1; ignored")
    if ranking_options and options is None:
        warnings.append(f"ranking options {', '.join(sorted(ranking_options))} are not used by the "
                        f"{ranking} ranking; ignored")

    ranked = _fit_and_rank(files, schedule, epoch, fit_sample, seed, previous_r0, previous_source, strategy,
                           options, track, dedup, groups_from)
    warnings.extend(ranked.warnings)
    t_write = time.perf_counter()
    _write_partitions(files, folder.root, ranked.p_clean, ranked.rank, ranked.n_safe, epoch, ranked.plan.ratio,
                      track)
    if ranked.groups is not None:
        write_groups(folder.groups_path, ranked.keys, ranked.groups.labels)
    timing = {**ranked.timing, "write": time.perf_counter() - t_write, "total": time.perf_counter() - t0}
    manifest = _manifest(emb, files, schedule, epoch, seed, ranking, ranked, warnings, timing)
    folder.write_manifest(manifest)
    return SplitResult(manifest, str(folder.root), warnings)
