"""`safeclip split`: safe and risky partitions from embedding files."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import done, progress, user_errors, warn

SPEC_SHORT = ("Ratio schedule SPEC: safeclip[:threshold=T,step=S,cap=C,r0=R] | fraction:F | threshold:T "
              "| estimate[:margin=M,cap=C,floor=L] (see above).")

# Typer keeps single newlines of help text, so every paragraph is one string.
HELP = "\n\n".join([
    "Split embedded pairs into safe and risky.",
    "Fits a 2-component Gaussian mixture to the pair similarities. It warns when the safe set is below "
    "10% of the pairs or the mixture's components overlap (split.json: separation).",
    "p_clean is the posterior of the higher-mean component. Pairs are ranked by p_clean (ties: similarity, "
    "then key; rank 0 = most clean) and the ratio schedule picks how many are safe.",
    "SPEC safeclip[:threshold=T,step=S,cap=C,r0=R] is SafeCLIP's schedule. Epoch 0: safe = p_clean >= T "
    "(default 0.9); that share is the start ratio r0. Epoch k >= 1: safe = top min(C, r0 + k*S) by p_clean "
    "(defaults S=0.01, C=0.85), with r0 from R, else from --previous, else recomputed from this fit at "
    "p_clean >= T.",
    "SPEC fraction:F: safe = top F (0..1) of all pairs by p_clean. SPEC threshold:T: safe = p_clean >= T.",
    "SPEC estimate[:margin=M,cap=C,floor=L]: safe = top 1 - w - M of all pairs by p_clean, kept within [L, C] "
    "(defaults M=0.01, C=0.95, L=0.3), where w is the share of mismatched pairs estimated from the pairs "
    "themselves against a shuffled-caption null (split.json: mismatched; docs/split.md).",
    "Examples: safeclip | safeclip:step=0.02,cap=0.8 | fraction:0.3 | threshold:0.95 | estimate",
    "--ranking global (default, the paper's) takes the top of all pairs. --ranking balanced clusters the pairs "
    "(faiss spherical k-means, --clusters K on --cluster-on joint|image|text embeddings) and takes the same "
    "total count as the schedule, shared out over the clusters by size, each filled by its own best p_clean: "
    "hard concepts are not starved. At epoch 0 the count is still the global p_clean >= T count.",
    "Writes OUT/safe/*.parquet and OUT/risky/*.parquet (key, caption, url, similarity, p_clean, rank, partition, "
    "epoch, ratio; one file per embedding file), then OUT/split.json. See docs/split.md.",
])


def split(
    emb: Path = typer.Argument(..., help="Folder written by `safeclip embed` (NNNNN.parquet + embed.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: safe/, risky/ and split.json."),
    ratio_schedule: str = typer.Option("safeclip", "--ratio-schedule", "-r", help=SPEC_SHORT),
    epoch: int = typer.Option(0, "--epoch", "-e", min=0, help="Split number k (0 = the first split)."),
    previous: Path = typer.Option(None, "--previous", help="An earlier split folder of the same run: its r0 "
                                                          "is used for epoch k >= 1 (SafeCLIP's schedule)."),
    fit_sample: int = typer.Option(1_000_000, "--fit-sample", help="Fit the mixture on a seeded sample of at "
                                                                   "most this many similarities."),
    seed: int = typer.Option(0, "--seed", help="Seed for the fit sample, the mixture's k-means init and the "
                                               "balanced ranking's clustering."),
    ranking: str = typer.Option("global", "--ranking", help="global (the paper's) or balanced (top share of "
                                                            "p_clean inside each k-means cluster)."),
    clusters: int = typer.Option(None, "--clusters", help="Balanced ranking: number of k-means clusters "
                                                          "(default 10)."),
    cluster_on: str = typer.Option(None, "--cluster-on", help="Balanced ranking: cluster joint (image+text, "
                                                              "default), image or text embeddings."),
    cluster_sample: int = typer.Option(None, "--cluster-sample", help="Balanced ranking: train k-means on a "
                                                                      "seeded sample of at most this many "
                                                                      "pairs (default 200000)."),
    dedup_tau: float = typer.Option(0.0, "--dedup-tau", min=0.0, max=1.0,
                                    help="Near-duplicate images (centred image-embedding cosine >= TAU, e.g. "
                                         "0.9999) keep at most one pair in the safe set (a group of more than 4: "
                                         "none), the count refilled by the next-best pairs; 0 = off."),
    force: bool = typer.Option(False, "--force", help="Replace an existing split in OUT."),
) -> None:
    """Split embedded pairs into safe and risky partitions (help text: HELP)."""
    from sanitize.io.artifacts import Split
    from sanitize.stages.split import split as run_split

    with user_errors():
        options = {name: value for name, value in (("clusters", clusters), ("cluster_on", cluster_on),
                                                   ("sample", cluster_sample)) if value is not None}
        result = run_split(emb, out, ratio_schedule, epoch=epoch, fit_sample=fit_sample, seed=seed,
                           previous=previous, ranking=ranking, ranking_options=options, force=force,
                           track=progress, dedup=dedup_tau or None)
    for message in result.warnings:
        warn(message)
    m = result.manifest
    counts, mix = m.counts, m.mixture
    r0 = f", r0 {m.r0:.4f}" if m.r0 is not None else ""
    balance = m.extra.get("balance")
    how = (f"balanced over {balance['clusters']} {balance['cluster_on']} clusters" if balance
           else f"{m.ranking} ranking")
    done(f"split {counts['total']:,} pairs at epoch {epoch} ({how}): {counts['safe']:,} safe "
         f"({counts['safe_share']:.1%}, target ratio {m.ratio:.4f}{r0}), {counts['risky']:,} risky; "
         f"mixture means {mix['means'][0]:.3f} / {mix['means'][1]:.3f}"
         + (f" (overlap {m.separation['overlap']:.1%}, Bhattacharyya coefficient "
            f"{m.separation['bhattacharyya']:.2f}, Ashman's D {m.separation['ashman_d']:.2f})"
            if m.separation else "") + "; "
         f"{m.timing_s['total']:.1f} s -> {Split(out).manifest_path}")


def register(app: typer.Typer) -> None:
    app.command("split", help=HELP)(split)
