"""`--defense none`: plain CLIP on every pair, every epoch — the baseline."""

from __future__ import annotations

from .base import Defense, Stream, register


@register
class NoDefense(Defense):
    """No warm-up, never splits: the same loop, data, optimizer and schedule as the
    defenses, so every benchmark compares against it."""

    name = "none"
    warms_up = False

    def streams(self, epoch, split):
        return [Stream("clip", "clip", None, self.plain_clip)]
