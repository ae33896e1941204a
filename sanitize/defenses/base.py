"""A defense decides, for every epoch of phase 3, what the model trains on.

It answers two questions the pretrain loop asks each epoch:
  `split_for(epoch)`   which split of the data the epoch uses: none, one made now
                       (score every pair, fit, rank, cut with a ratio schedule), or an
                       earlier one again;
  `streams(epoch, split)`  which pairs train with which loss: a list of streams, each
                       every pair or one partition of the split, with the CLIP loss
                       (on plain pairs or two augmented views) or the unimodal loss.
The loop interleaves the streams' batches in proportion to their sizes. Nothing here
touches files or the model: a defense is policy, the stage does the work.

Adding a defense is one class in one file of this package, registered with
`@register`, plus its import in `__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..io.artifacts import Split
    from ..stages.config import PretrainConfig


@dataclass(frozen=True)
class SplitRequest:
    """A split an epoch trains on: RUN/splits/epoch=`at`. Made at epoch `at` with the
    schedule at its epoch `schedule_epoch`; `previous` is the epoch of an earlier split
    whose start ratio r0 carries over; `from_training` scores it from the previous
    epoch's training pass instead of a separate no-grad pass."""

    at: int
    schedule: str
    schedule_epoch: int = 0
    ranking: str = "global"
    previous: int | None = None
    from_training: bool = False
    dedup: float = 0.0          # near-duplicate threshold: at most one pair of a group safe (0: off)
    groups_from: int | None = None  # the epoch of an earlier split whose near-duplicate groups to reuse


@dataclass(frozen=True)
class Stream:
    """Pairs trained with one loss in an epoch. `partition`: "safe" or "risky" of the
    epoch's split, or None for every pair; `plain`: the CLIP loss on the pair as it is
    (eval transform, caption as written) instead of two augmented views."""

    name: str
    loss: str
    partition: str | None = None
    plain: bool = False


class Defense:
    """The base: subclasses set `name` and override what differs."""

    name: ClassVar[str] = ""
    warms_up: ClassVar[bool] = True            # phases 1–2 (the warm-up) before phase 3
    default_schedule: ClassVar[str | None] = None
    cross_views_by_default: ClassVar[bool] = False   # what --clip-views auto means
    scores_from_training: ClassVar[bool] = False     # accepts --score-from-training
    default_score_from_training: ClassVar[bool] = False
    default_risky_loss: ClassVar[str] = "none"       # what --risky-loss auto means
    default_dedup: ClassVar[float] = 0.0             # what --dedup-tau means when not given
    # With --score-from-training, the first `separate_splits` phase-3 splits are still scored by
    # a separate pass: the first can be scored no other way, and the first phase-3 epoch moves
    # the model most, so its training pass's embeddings lag the model that ends it.
    separate_splits: ClassVar[int] = 1

    def __init__(self, config: "PretrainConfig"):
        self.config = config

    # ---- configuration ----------------------------------------------------------------

    @property
    def schedule(self) -> str:
        return self.config.ratio_schedule or self.default_schedule or "safeclip"

    @property
    def plain_clip(self) -> bool:
        """Whether the CLIP loss trains on plain pairs ("plain") or two views ("cross")."""
        views = self.config.clip_views
        return views == "plain" or (views == "auto" and not self.cross_views_by_default)

    @property
    def risky_loss(self) -> str:
        """What trains the risky partition: "unimodal" (SafeCLIP's) or "none"."""
        loss = self.config.risky_loss
        return self.default_risky_loss if loss == "auto" else loss

    @property
    def score_from_training(self) -> bool:
        """Whether later splits reuse the training pass's embeddings (stages/scoring.py)."""
        given = self.config.score_from_training
        return self.default_score_from_training if given is None else given

    def scored_from_training(self, k: int) -> bool:
        """Whether phase-3 split k (0: the first) reuses the previous epoch's training pass."""
        return self.score_from_training and k >= self.separate_splits

    @property
    def trains_unimodal(self) -> bool:
        """Whether some stream takes the unimodal loss (the NNCLR memory banks carry on)."""
        return self.risky_loss == "unimodal"

    @property
    def dedup(self) -> float:
        """The near-duplicate threshold of this defense's splits (0: no grouping)."""
        return self.default_dedup if self.config.dedup_tau is None else self.config.dedup_tau

    @property
    def warm_epochs(self) -> int:
        """Epochs of phases 1–2 at the start of the run."""
        w = self.config.warmup
        return w.unimodal_epochs + w.clip_epochs if self.warms_up else 0

    def validate(self) -> None:
        """Raise ValueError for settings this defense cannot run with."""
        if self.score_from_training and not self.scores_from_training:
            raise ValueError(f"--score-from-training does not apply to --defense {self.name}")
        if self.warms_up:
            self.config.warmup.validate()
            if self.warm_epochs >= self.config.epochs:
                raise ValueError(f"--unimodal-epochs + --clip-epochs ({self.warm_epochs}) must be fewer than "
                                 f"--epochs ({self.config.epochs}): no epoch would be left to train on the split")

    # ---- every epoch ------------------------------------------------------------------------

    def split_for(self, epoch: int) -> SplitRequest | None:
        return None

    def streams(self, epoch: int, split: "Split | None") -> list[Stream]:
        raise NotImplementedError


DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    if not cls.name or cls.name in DEFENSES:
        raise ValueError(f"defense name {cls.name!r} is empty or taken")
    DEFENSES[cls.name] = cls
    return cls


def make_defense(config: "PretrainConfig") -> Defense:
    """The registered defense `config.defense`, validated against the config."""
    if config.defense not in DEFENSES:
        raise ValueError(f"unknown defense {config.defense!r}; choose one of {', '.join(DEFENSES)}")
    defense = DEFENSES[config.defense](config)
    defense.validate()
    return defense
