"""`safeclip demo`: the whole sanitization pipeline on the bundled Fashion-MNIST sample.

poison (BadNet + targeted) -> warm-up -> embed -> split -> query -> report, each
stage the same library call the individual commands make, writing into one
folder. The summary's numbers are measured on this run, never assumed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io.artifacts import Run
from ..io.fashion_mnist import sample_path
from .config import DemoConfig


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
    schedule: str = ""
    poisons: int = 0                 # injected poisons (noise not counted)
    poisons_in_safe: int = 0
    separation: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def safe(self) -> int:
        return self.pairs - self.risky

    @property
    def safe_share(self) -> float:
        return self.safe / self.pairs if self.pairs else 0.0

    @property
    def poison_free_share(self) -> float | None:
        """The largest safe share that holds no poison on this ranking."""
        return None if self.first_poison_rank is None else self.first_poison_rank / self.pairs


Stage = Callable[[str], None]


def _inject(sample: Path, out: Path, config: DemoConfig) -> Path:
    """BadNet, then targeted poisoning on top (one manifest holds both); returns the poisoned set."""
    from ..attacks import triggers
    from ..attacks.poison import PoisonConfig, poison

    backdoored, poisoned = out / "data" / "badnet", out / "data" / "poisoned"
    poison(str(sample / "train"), backdoored,
           PoisonConfig(attack="badnet", seed=config.seed, target_class=config.badnet_target,
                        count=config.badnet_count, trigger=triggers.badnet_spec(seed=config.seed)))
    poison(str(backdoored), poisoned,
           PoisonConfig(attack="targeted", seed=config.seed, targets=config.targets, copies=config.copies,
                        target_source=str(sample / "test")))
    shutil.rmtree(backdoored)  # the second poison run carried its pairs and manifest over
    return poisoned


def _summary(out: Path, part: Path, report: Path, seconds: dict, schedule: str) -> DemoSummary:
    """What the split holds, read back from its files (detection metrics and the most risky pairs)."""
    from ..evaluation.evaluate import split_detection
    from ..io.artifacts import Split
    from .query import connect

    detection = split_detection(part)
    manifest = Split(part).manifest()
    everything = [row for row in detection["rows"] if row["kind"] == "poison"]
    recall = [{"attack": row["name"], "poisons": row["total"], "risky": row["in_risky"], "recall": row["recall"]}
              for row in detection["rows"] if row["name"] != "all poisons"]
    con = connect(part)
    most_risky = [dict(zip(("key", "caption", "similarity", "p_clean", "attack"), row)) for row in con.execute(
        "SELECT p.key, p.caption, p.similarity, p.p_clean, coalesce(t.attack, '') "
        "FROM risky p LEFT JOIN truth t USING (key) ORDER BY p.rank DESC LIMIT 5").fetchall()]
    con.close()
    return DemoSummary(out=out, pairs=detection["n"], risky=detection["risky"], recall=recall,
                       most_risky=most_risky, report=report, first_poison_rank=detection["first_poison_rank"],
                       seconds=seconds, schedule=schedule, poisons=detection["poisons"],
                       poisons_in_safe=everything[-1]["in_safe"] if everything else 0,
                       separation=manifest.separation, warnings=list(manifest.warnings))


def run_demo(config: DemoConfig, on_stage: Stage = lambda name: None, force: bool = False) -> DemoSummary:
    """Run every stage into `config.out`; returns what the run measured."""
    from .config import EmbedConfig
    from .embed import run_embed
    from .report import build_report
    from .split import split
    from .warmup import WarmupConfig, run_warmup

    warmup_config = WarmupConfig(unimodal_epochs=config.unimodal_epochs, clip_epochs=config.clip_epochs,
                                 clip_lr_scale=config.clip_lr_scale, batch_size=config.batch_size, lr=config.lr,
                                 seed=config.seed, num_workers=1)
    warmup_config.validate()  # bad options fail before OUT is touched
    EmbedConfig(workers=config.workers).validate()
    if not 0 <= config.dedup_tau <= 1:
        raise ValueError(f"--dedup-tau must be between 0 (off) and 1, got {config.dedup_tau}")
    out = Path(config.out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out}: exists; pass --force to replace it or --out for another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        on_stage(name)
        start = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        return result

    poisoned = timed("poison", lambda: _inject(sample_path(), out, config))
    checkpoint, emb, part, report = out / Run.WARMUP, out / "embeddings", out / "split", out / "report.html"
    # 0: the thread policy (one core left to the decoding worker); the result depends on the thread count
    timed("warmup", lambda: run_warmup(str(poisoned), checkpoint, warmup_config, threads=config.threads or 0))
    timed("embed", lambda: run_embed(str(poisoned), checkpoint, emb, EmbedConfig(workers=config.workers)))
    timed("split", lambda: split(emb, part, config.schedule, epoch=0, seed=config.seed,
                                 dedup=config.dedup_tau or None))
    timed("report", lambda: report.write_text(build_report(part)[0], encoding="utf-8"))
    return _summary(out, part, report, seconds, config.schedule)
