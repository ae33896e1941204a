"""`--defense clip-score`: DataComp-style filtering — one split after the warm-up,
then CLIP on that safe set only."""

from __future__ import annotations

from .base import Defense, SplitRequest, Stream, register
from .schedule import parse_schedule


@register
class ClipScore(Defense):
    """Warm-up, then **one** split with a fixed cut (`fraction:F` or `threshold:T`,
    default the top 30%), then plain CLIP on that safe set for every later epoch; the
    filtered-out pairs are not trained on at all."""

    name = "clip-score"
    default_schedule = "fraction:0.3"

    def validate(self) -> None:
        super().validate()
        if parse_schedule(self.schedule).kind == "safeclip":
            raise ValueError("--defense clip-score needs a fixed cut: --ratio-schedule fraction:F or threshold:T")

    def split_for(self, epoch):
        return SplitRequest(at=self.warm_epochs, schedule=self.schedule, ranking=self.config.ranking,
                            dedup=self.dedup)

    def streams(self, epoch, split):
        return [Stream("clip", "clip", "safe", self.plain_clip)]
