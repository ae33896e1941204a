"""A self-contained HTML report of one split.

One file, no external resources: an inline SVG histogram of the similarities
(safe and risky stacked) with the two fitted Gaussian components scaled to
counts and the safe/risky cut, the counts and mixture parameters, the most risky
pairs with base64 thumbnails read back from the original source, and — when a
poison manifest (`truth`) is present — recall and precision of the poisons in the
risky set, per attack.

Numbers come from DuckDB over the partitions (`sanitize.query.connect`), so the
report costs a few aggregate queries even for millions of pairs; only the top-N
risky pairs' images are decoded.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..defenses.gmm import Mixture, density
from ..evaluation.evaluate import split_detection
from ..io.artifacts import Embeddings, Split
from .query import connect, locate, view_names

SAFE_COLOUR, RISKY_COLOUR = "#3a9d5d", "#d1495b"


@dataclass
class RiskyPair:
    key: str
    caption: str
    similarity: float
    p_clean: float
    rank: int
    shard: str
    attack: str | None = None
    thumbnail: str | None = None  # a data: URI


@dataclass
class ReportData:
    manifest: dict
    edges: np.ndarray
    safe_counts: np.ndarray
    risky_counts: np.ndarray
    risky: list[RiskyPair]
    detection: list[dict] | None
    notes: list[str] = field(default_factory=list)


# ---- gathering ----------------------------------------------------------------------

def _histogram(con, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = con.execute("SELECT min(similarity), max(similarity) FROM pairs WHERE isfinite(similarity)").fetchall()[0]
    if lo is None:
        return np.linspace(-1, 1, bins + 1), np.zeros(bins), np.zeros(bins)
    if hi <= lo:
        lo, hi = lo - 0.01, hi + 0.01
    edges = np.linspace(lo, hi, bins + 1)
    width = (hi - lo) / bins
    rows = con.execute(
        f"SELECT least({bins - 1}, CAST(floor((similarity - {lo!r}) / {width!r}) AS INTEGER)) AS b, "
        "partition, count(*) FROM pairs WHERE isfinite(similarity) GROUP BY ALL").fetchall()
    safe, risky = np.zeros(bins), np.zeros(bins)
    for b, part, n in rows:
        (safe if part == "safe" else risky)[max(0, b)] += n
    return edges, safe, risky


def _most_risky(con, part: str, top: int, with_truth: bool) -> list[RiskyPair]:
    """The `top` highest-ranked risky pairs with the shard each comes from. The sandboxed
    connection opens no file itself, so this fixed query over the split's own files runs on
    a private connection; the attack of each pair is then looked up in the sandbox's `truth`."""
    import duckdb

    files = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in locate(part).risky) + "]"
    table = duckdb.connect(":memory:").sql(
        f"SELECT key, caption, similarity, p_clean, rank, parse_filename(filename, true) AS shard "
        f"FROM read_parquet({files}, filename = true) ORDER BY rank DESC LIMIT {int(top)}").to_arrow_table()
    con.register("_safeclip_report_top", table)
    attack = ("(SELECT CASE WHEN t.kind = 'poison' THEN coalesce(t.attack, 'poison') WHEN t.kind = 'noise' "
              "THEN 'noise' END FROM truth t WHERE t.key = r.key LIMIT 1)") if with_truth else "NULL"
    rows = con.execute(f"SELECT key, caption, similarity, p_clean, rank, shard, {attack} "
                       "FROM _safeclip_report_top r ORDER BY rank DESC").fetchall()
    con.unregister("_safeclip_report_top")
    return [RiskyPair(k, c, float(s), float(p), int(r), f, a) for k, c, s, p, r, f, a in rows]


def thumbnail_uri(image, size: int) -> str:
    """A data: URI of the image fitted in size x size; small images scale up by an
    integer factor with nearest-neighbour so pixels stay crisp (Fashion-MNIST is 28 px)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if max(w, h) < size:
        factor = max(1, size // max(w, h))
        image = image.resize((w * factor, h * factor), Image.NEAREST)
    else:
        image = image.copy()
        image.thumbnail((size, size), Image.LANCZOS)
    buffer = io.BytesIO()
    small = max(w, h) <= 64
    image.save(buffer, format="PNG" if small else "JPEG", quality=85)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buffer.getvalue()).decode()


def attach_thumbnails(pairs: list[RiskyPair], source: str | None, source_format: str | None, size: int,
                      duplicate_keys: str = "error") -> str | None:
    """Read the images of `pairs` from the source, each from its own shard (a pair is its shard
    and key); returns a note when they cannot all be found."""
    from ..io.artifacts import embedding_file_name
    from ..io.pairs import SourceError, open_pairs

    if not pairs:
        return None
    if not source:
        return f"no thumbnails: the embedding folder records no source ({Embeddings.MANIFEST})"
    try:
        src = open_pairs(source, format=source_format if source_format in ("webdataset", "parquet", "csv",
                                                                            "folder") else None,
                         duplicate_keys=duplicate_keys)
    except SourceError as exc:
        return f"no thumbnails: {exc}"
    # Embedding (and partition) files are named after their source shard, so only those shards are read.
    stems = {Path(embedding_file_name(s.name)).stem: s for s in src.shards}
    by_shard = all(p.shard in stems for p in pairs)
    wanted: dict[tuple[str, str], list[RiskyPair]] = {}
    for p in pairs:
        wanted.setdefault((p.shard if by_shard else "", p.key), []).append(p)
    shards = [stems[s] for s in sorted({p.shard for p in pairs})] if by_shard else src.shards
    try:
        for shard in shards:
            stem = Path(embedding_file_name(shard.name)).stem if by_shard else ""
            for pair in shard.pairs(src.skips):
                for target in wanted.pop((stem, pair.key), []):
                    target.thumbnail = thumbnail_uri(pair.image, size)
                if not wanted:
                    return None
    except SourceError as exc:
        return f"no thumbnails: {exc}"
    return f"no thumbnail for {sum(len(v) for v in wanted.values())} pair(s): key not found in {source}"


def gather(part: str | os.PathLike, top: int = 24, bins: int = 60, thumb_px: int = 96,
           meta: str | None = None, truth: str | None = None) -> ReportData:
    part = str(part)
    manifest = Split(part).check_complete().to_json()  # a half-written split is never reported
    con = connect(part, meta=meta, truth=truth)
    with_truth = "truth" in view_names(con)
    edges, safe, risky = _histogram(con, bins)
    pairs = _most_risky(con, part, top, with_truth)
    notes = []
    note = attach_thumbnails(pairs, manifest.get("source"), manifest.get("source_format"), thumb_px,
                             manifest.get("duplicate_keys") or "error")
    if note:
        notes.append(note)
    detection = split_detection(part, truth)["rows"] if with_truth else None
    if not with_truth:
        notes.append("no poison manifest found beside the source (pass --truth) — detection metrics omitted")
    return ReportData(manifest, edges, safe, risky, pairs, detection, notes)


# ---- rendering ------------------------------------------------------------------------

def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _compact(count: float) -> str:
    """Axis labels that stay short: 600k, 1.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.3g}"


def histogram_svg(data: ReportData, width: int = 900, height: int = 340) -> str:
    """Stacked safe/risky histogram, the two fitted components (scaled to counts) and the cut."""
    m = data.manifest
    mix = m["mixture"]
    mixture = Mixture(tuple(mix["means"]), tuple(mix["variances"]), tuple(mix["weights"]),
                      mix["converged"], mix["n_iter"], mix["n_fit"])
    edges, safe, risky = data.edges, data.safe_counts, data.risky_counts
    left, right, top, bottom = 60, 20, 20, 45
    pw, ph = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    bin_width = (hi - lo) / len(safe)
    n_finite = float(safe.sum() + risky.sum())
    grid = np.linspace(lo, hi, 300)
    curves = [n_finite * bin_width * density(grid, mixture, c) for c in (0, 1)]
    ymax = max(float((safe + risky).max()), float((curves[0] + curves[1]).max()), 1.0) * 1.08
    x = lambda v: left + (v - lo) / (hi - lo) * pw  # noqa: E731
    y = lambda v: top + ph - v / ymax * ph  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="histogram" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="similarity histogram">']
    for t in _nice_ticks(0, ymax, 5):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_compact(t)}</text>')
    for i, (s, r) in enumerate(zip(safe, risky)):
        x0, x1 = x(edges[i]), x(edges[i + 1])
        w = max(x1 - x0 - 0.5, 0.5)
        parts.append(f'<rect class="bar risky" x="{x0:.2f}" y="{y(r):.2f}" width="{w:.2f}" '
                     f'height="{y(0) - y(r):.2f}" fill="{RISKY_COLOUR}"><title>{edges[i]:.3f}–{edges[i + 1]:.3f}: '
                     f'{int(r):,} risky, {int(s):,} safe</title></rect>')
        parts.append(f'<rect class="bar safe" x="{x0:.2f}" y="{y(r + s):.2f}" width="{w:.2f}" '
                     f'height="{y(r) - y(r + s):.2f}" fill="{SAFE_COLOUR}"/>')
    names = ("risky component", "clean component")
    colours = ("#7a1020", "#14532d")
    for c, curve in enumerate(curves):
        d = "M" + " L".join(f"{x(g):.1f},{y(v):.1f}" for g, v in zip(grid, curve))
        parts.append(f'<path class="component" d="{d}" stroke="{colours[c]}" stroke-width="2.2" '
                     f'stroke-dasharray="6 3" fill="none"><title>{names[c]}: mean {mixture.means[c]:.3f}, '
                     f'sd {math.sqrt(mixture.variances[c]):.3f}, weight {mixture.weights[c]:.3f}</title></path>')
    cut = m.get("similarity_cutoff")
    if cut is not None and lo <= cut <= hi:
        label = f"safe ≥ {cut:.3f}"
        if m.get("p_clean_cutoff") is not None:
            label += f" (p_clean ≥ {m['p_clean_cutoff']:.3g})"
        anchor = "end" if x(cut) > left + pw * 0.7 else "start"
        dx = -6 if anchor == "end" else 6
        parts.append(f'<line class="threshold" x1="{x(cut):.1f}" x2="{x(cut):.1f}" y1="{top}" y2="{top + ph}" '
                     f'stroke="#1d4ed8" stroke-width="2"/>'
                     f'<text class="threshold-label" x="{x(cut) + dx:.1f}" y="{top + 14}" text-anchor="{anchor}" '
                     f'fill="#1d4ed8">{html.escape(label)}</text>')
    for t in _nice_ticks(lo, hi, 8):
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top + ph}" y2="{top + ph + 5}" class="axis"/>'
                     f'<text x="{x(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>'
                 f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">cosine similarity '
                 f'(image, caption)</text>'
                 f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
                 f'pairs</text></svg>')
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;
color:#1f2328;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eaeef2;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.legend span{display:inline-block;margin-right:16px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-1px;margin-right:5px;border-radius:2px}
svg.histogram{max-width:100%;height:auto}.histogram text{font-size:11px;fill:#57606a}
.histogram .grid{stroke:#eaeef2}.histogram .axis{stroke:#8c959f}
.histogram text.threshold-label{font-size:12px;fill:#1d4ed8;font-weight:600}
.grid-pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:10px}
.pair{border:1px solid #d0d7de;border-radius:6px;padding:8px;display:flex;gap:8px;align-items:flex-start}
.pair img{width:72px;height:72px;object-fit:contain;image-rendering:pixelated;background:#f6f8fa;flex:none}
.pair .noimg{width:72px;height:72px;background:#f6f8fa;flex:none;display:flex;align-items:center;
justify-content:center;color:#8c959f;font-size:11px}
.pair .cap{font-size:13px;word-break:break-word}.pair .meta{font-size:11px;color:#57606a;margin-top:4px}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:9px;background:#fde2e4;color:#8a1c2b;
margin-top:4px}.badge.noise{background:#fff1c2;color:#7a5a00}
.notes{color:#7a5a00;background:#fff8e1;border:1px solid #f0d98c;padding:6px 10px;border-radius:6px}
"""


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def render(data: ReportData, title: str = "safeclip split report") -> str:
    m = data.manifest
    c, mix = m["counts"], m["mixture"]
    e = html.escape
    schedule = m["schedule"].get("spec", "")
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>{e(title)}</h1><p class=\"sub\">epoch {m['epoch']} · schedule <code>{e(schedule)}</code> · "
           f"{c['total']:,} pairs · seed {m['seed']}</p>",
           '<div class="cards">'
           f'<div class="card">pairs<b>{c["total"]:,}</b></div>'
           f'<div class="card">safe<b style="color:{SAFE_COLOUR}">{c["safe"]:,}</b>{_pct(c["safe_share"])}</div>'
           f'<div class="card">risky<b style="color:{RISKY_COLOUR}">{c["risky"]:,}</b>'
           f'{_pct(1 - c["safe_share"] if c["total"] else None)}</div>'
           f'<div class="card">target ratio<b>{m["ratio"]:.4f}</b>'
           f'{"r0 " + format(m["r0"], ".4f") if m.get("r0") is not None else ""}</div></div>']
    if data.notes or m.get("warnings"):
        out.append('<p class="notes">' + "<br>".join(e(n) for n in list(m.get("warnings", [])) + data.notes) + "</p>")
    out.append("<h2>Similarity histogram and mixture fit</h2>")
    out.append(f'<p class="legend"><span><i class="sw" style="background:{SAFE_COLOUR}"></i>safe</span>'
               f'<span><i class="sw" style="background:{RISKY_COLOUR}"></i>risky</span>'
               '<span>- - fitted components (scaled to counts)</span>'
               '<span style="color:#1d4ed8">| safe/risky cut</span></p>')
    out.append(histogram_svg(data))
    out.append("<table><tr><th>component</th><th>mean</th><th>sd</th><th>weight</th></tr>")
    for i, name in enumerate(("risky (low mean)", "clean (high mean)")):
        out.append(f"<tr><td>{name}</td><td class=num>{mix['means'][i]:.4f}</td>"
                   f"<td class=num>{math.sqrt(mix['variances'][i]):.4f}</td>"
                   f"<td class=num>{mix['weights'][i]:.4f}</td></tr>")
    out.append(f"</table><p class=\"sub\">fitted on {m['fit_sample']:,} similarities; converged "
               f"{'yes' if mix['converged'] else 'no'} after {mix['n_iter']} iterations.</p>")
    if data.detection is not None:
        out.append("<h2>Poisons in the risky set (ground truth)</h2><table><tr><th>kind</th><th>pairs</th>"
                   "<th>in risky</th><th>in safe (leaked)</th><th>recall</th><th>precision</th></tr>")
        for r in data.detection:
            out.append(f"<tr><td>{e(str(r['name']))}</td><td class=num>{r['total']:,}</td>"
                       f"<td class=num>{r['in_risky']:,}</td><td class=num>{r['in_safe']:,}</td>"
                       f"<td class=num>{_pct(r['recall'])}</td><td class=num>{_pct(r['precision'])}</td></tr>")
        out.append("</table><p class=\"sub\">recall: share of that kind's pairs in the risky set; precision: "
                   "share of the risky set that is of that kind.</p>")
    out.append(f"<h2>The {len(data.risky)} most risky pairs</h2><div class=\"grid-pairs\">")
    for p in data.risky:
        image = (f'<img src="{p.thumbnail}" alt="{e(p.key)}">' if p.thumbnail
                 else '<div class="noimg">no image</div>')
        badge = (f'<div class="badge{" noise" if p.attack == "noise" else ""}">{e(p.attack)}</div>'
                 if p.attack else "")
        out.append(f'<div class="pair" data-key="{e(p.key)}">{image}<div><div class="cap">{e(p.caption)}</div>'
                   f'<div class="meta">key {e(p.key)} · sim {p.similarity:.3f} · p_clean {p.p_clean:.2g} · '
                   f'rank {p.rank:,}</div>{badge}</div></div>')
    out.append("</div>")
    out.append(f"<p class=\"sub\">source: {e(str(m.get('source')))} · embeddings: {e(str(m.get('emb')))}</p>"
               "</body></html>\n")
    return "".join(out)


def build_report(part: str | os.PathLike, top: int = 24, bins: int = 60, thumb_px: int = 96,
                 meta: str | None = None, truth: str | None = None) -> tuple[str, ReportData]:
    data = gather(part, top=top, bins=bins, thumb_px=thumb_px, meta=meta, truth=truth)
    return render(data), data
