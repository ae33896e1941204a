"""`safeclip demo`: the whole sanitization pipeline on the bundled Fashion-MNIST sample.

poison (BadNet + targeted) -> warm-up -> embed -> split -> query -> report, each
stage the same library call the individual commands make, writing into one
folder. The summary's numbers are measured on this run, never assumed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io.fashion_mnist import sample_path


@dataclass
class DemoConfig:
    out: str = "safeclip-demo"
    seed: int = 0
    badnet_count: int = 50          # 1% of the 5,000 sample pairs
    badnet_target: str = "trouser"
    targets: int = 4                # targeted poisoning: images from the sample's test set ...
    copies: int = 25                # ... each added this many times with a wrong class's captions
    unimodal_epochs: int = 1
    clip_epochs: int = 2
    # The paper's 0.01 x lr assumes CC3M's ~20k steps an epoch; the sample has ~20, at which
    # 0.01 barely aligns the towers (docs/performance.md). Short full-rate CLIP warm-up aligns
    # them, still far too little to learn 25 copies of a poison (measured in docs/demo.md).
    clip_lr_scale: float = 1.0
    batch_size: int = 256
    lr: float = 1e-3
    schedule: str = "safeclip"
    workers: int = 2


@dataclass
class DemoSummary:
    out: Path
    pairs: int
    risky: int
    recall: list[dict]               # per attack (and natural noise): poisons, risky, recall
    most_risky: list[dict]           # key, caption, similarity, p_clean, attack
    report: Path
    first_poison_rank: int | None    # rank (0 = most clean) of the cleanest-looking poison
    seconds: dict = field(default_factory=dict)


Stage = Callable[[str], None]


def run_demo(config: DemoConfig, on_stage: Stage = lambda name: None, force: bool = False) -> DemoSummary:
    """Run every stage into `config.out`; returns what the run measured."""
    from ..attacks import triggers
    from ..models.checkpoint import load_checkpoint
    from ..train.augment import eval_transform
    from .embed import embed_source, write_manifest
    from ..io.pairs import open_pairs
    from ..attacks.poison import PoisonConfig, poison
    from .query import connect
    from .report import build_report
    from .split import split
    from .warmup import WarmupConfig, run_warmup

    out = Path(config.out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out}: exists; pass --force to replace it or --out for another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sample = sample_path()
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        on_stage(name)
        start = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        return result

    backdoored, poisoned = out / "data" / "badnet", out / "data" / "poisoned"

    def inject() -> None:
        poison(str(sample / "train"), backdoored,
               PoisonConfig(attack="badnet", seed=config.seed, target_class=config.badnet_target,
                            count=config.badnet_count, trigger=triggers.badnet_spec(seed=config.seed)))
        poison(str(backdoored), poisoned,
               PoisonConfig(attack="targeted", seed=config.seed, targets=config.targets, copies=config.copies,
                            target_source=str(sample / "test")))
        shutil.rmtree(backdoored)  # the second poison run carried its pairs and manifest over

    timed("poison", inject)
    checkpoint = out / "warmup.pt"
    warmup_config = WarmupConfig(unimodal_epochs=config.unimodal_epochs, clip_epochs=config.clip_epochs,
                                 clip_lr_scale=config.clip_lr_scale, batch_size=config.batch_size, lr=config.lr,
                                 seed=config.seed, num_workers=1)
    threads = max(1, (os.cpu_count() or 1) - 1)  # one core for the decoding worker, as the CLI does
    timed("warmup", lambda: run_warmup(str(poisoned), checkpoint, warmup_config, threads=threads))

    emb = out / "embeddings"

    def embed() -> None:
        model, tokenizer, image_size, _config, _state = load_checkpoint(checkpoint)
        source = open_pairs(str(poisoned))
        result = embed_source(source, model, tokenizer, eval_transform(image_size), emb,
                              num_workers=config.workers)
        write_manifest(emb, checkpoint=str(checkpoint), source=source, dtype="float16", augment=False,
                       seconds=result.seconds, world_size=1)

    timed("embed", embed)
    part = out / "split"
    timed("split", lambda: split(emb, part, config.schedule, epoch=0, seed=config.seed))

    con = connect(part)
    pairs, risky = con.execute("SELECT count(*), count(*) FILTER (WHERE partition = 'risky') FROM pairs").fetchone()
    recall = [dict(zip(("attack", "poisons", "risky"), row)) for row in con.execute(
        "SELECT coalesce(t.attack, t.kind) AS what, count(*), count(*) FILTER (WHERE p.partition = 'risky') "
        "FROM truth t JOIN pairs p USING (key) WHERE t.kind <> 'clean' "
        "GROUP BY what ORDER BY what = 'noise', what"
    ).fetchall()]
    for row in recall:
        row["recall"] = row["risky"] / row["poisons"] if row["poisons"] else float("nan")
    most_risky = [dict(zip(("key", "caption", "similarity", "p_clean", "attack"), row)) for row in con.execute(
        "SELECT p.key, p.caption, p.similarity, p.p_clean, coalesce(t.attack, '') "
        "FROM risky p LEFT JOIN truth t USING (key) ORDER BY p.rank DESC LIMIT 5").fetchall()]
    (first_poison_rank,) = con.execute(
        "SELECT min(p.rank) FROM pairs p JOIN truth t USING (key) WHERE t.kind = 'poison'").fetchone()
    con.close()

    report = out / "report.html"

    def write_report() -> None:
        html, _data = build_report(part)
        report.write_text(html, encoding="utf-8")

    timed("report", write_report)
    return DemoSummary(out=out, pairs=pairs, risky=risky, recall=recall, most_risky=most_risky, report=report,
                       first_poison_rank=first_poison_rank, seconds=seconds)
