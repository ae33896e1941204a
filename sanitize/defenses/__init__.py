"""Defenses: the split's mixture, schedule and rankings, and the training strategies
built on them (one module per defense; `base.py` says how to add one)."""

from . import clip_score, none, resplit, safeclip  # noqa: F401  (registers each defense)
from .base import DEFENSES, Defense, SplitRequest, Stream, make_defense, register  # noqa: F401
