"""`--defense safeclip`: the paper's loop — split every epoch, CLIP on the safe set,
the unimodal loss on the risky set."""

from __future__ import annotations

from .base import Defense, SplitRequest, Stream, register


@register
class SafeCLIP(Defense):
    """Every phase-3 epoch k: score every pair, split with the ratio schedule at its
    epoch k (r0 from the first split), then one pass over the safe partition with the
    CLIP loss (SafeCLIP's cross-augmented views by default) interleaved with the risky
    partition under the unimodal loss."""

    name = "safeclip"
    default_schedule = "safeclip"
    cross_views_by_default = True
    scores_from_training = True
    default_risky_loss = "unimodal"

    def split_for(self, epoch):
        k = epoch - self.warm_epochs
        return SplitRequest(at=epoch, schedule=self.schedule, schedule_epoch=k, ranking=self.config.ranking,
                            previous=self.warm_epochs if k > 0 else None,
                            from_training=self.scored_from_training(k), dedup=self.dedup)

    def streams(self, epoch, split):
        risky = [Stream("unimodal", "unimodal", "risky")] if self.risky_loss == "unimodal" else []
        return [Stream("clip", "clip", "safe", self.plain_clip), *risky]
