"""`--defense resplit` (the default): SafeCLIP's warm-up and per-epoch split, trained the
way this project's measurements found both safe and accurate.

Every phase-3 epoch scores every pair and splits again, and the CLIP loss trains on the
safe set only, as plain pairs; the risky set is left out; near-duplicate images keep at
most one pair in the safe set; the safe share does not wait for the warm-up's mixture to
separate. What each choice buys and costs, measured, is in docs/results.md ("Where the
accuracy goes"); the paper's loop stays `--defense safeclip`.
"""

from __future__ import annotations

from .base import Defense, SplitRequest, Stream, register
from .duplicates import DEFAULT_TAU
from .schedule import parse_schedule


@register
class Resplit(Defense):
    """Warm-up; then every epoch: score (from the third split on, the training pass's
    plain-pair embeddings plus a no-grad pass over the rest), split to a fixed safe share
    with near-duplicate groups capped at one pair, and train plain CLIP on the safe set."""

    name = "resplit"
    default_schedule = "fraction:0.85"
    scores_from_training = True
    default_score_from_training = True
    default_dedup = DEFAULT_TAU
    # Scored from training, the second split let in 10x the poisons of a separate pass
    # (50 vs 5 BadNet pairs, 15 vs 3 targeted copies at 20k pairs; later splits alike):
    # one more scoring pass buys that back (docs/research.md).
    separate_splits = 2

    def split_for(self, epoch):
        k = epoch - self.warm_epochs
        grows = parse_schedule(self.schedule).kind == "safeclip"  # only that schedule carries r0 over
        return SplitRequest(at=epoch, schedule=self.schedule, schedule_epoch=k, ranking=self.config.ranking,
                            previous=self.warm_epochs if k > 0 and grows else None,
                            from_training=self.scored_from_training(k), dedup=self.dedup,
                            # copies are found once, on the first split's one-model embeddings
                            groups_from=self.warm_epochs if k > 0 and self.dedup else None)

    def streams(self, epoch, split):
        risky = [Stream("unimodal", "unimodal", "risky")] if self.risky_loss == "unimodal" else []
        return [Stream("clip", "clip", "safe", self.plain_clip), *risky]
