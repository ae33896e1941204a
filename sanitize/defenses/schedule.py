"""SafeCLIP's ratio schedule: how many pairs are safe at each split.

Grammar (SPEC), documented in docs/split.md:
  safeclip[:threshold=T,step=S,cap=C,r0=R]
      SafeCLIP's schedule. Epoch 0: safe = p_clean >= T (default 0.9); its share is
      the start ratio r0. Epoch k >= 1: safe = top min(C, r0 + k*S) of all pairs by
      p_clean (defaults S=0.01, C=0.85). r0 comes from R if given, else from the
      previous split of the run, else from this fit at p_clean >= T.
  fraction:F    safe = top F of all pairs by p_clean, at every epoch.
  threshold:T   safe = p_clean >= T, at every epoch.
  estimate[:margin=M,cap=C,floor=L]
      safe = top (1 - w - M) of all pairs by p_clean, where w is the share of mismatched
      pairs estimated at this split from a shuffled-caption null (defenses/mismatch.py),
      kept within [L, C] (defaults M=0.01, C=0.95, L=0.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("safeclip", "fraction", "threshold", "estimate")
ESTIMATE_DEFAULTS = {"margin": 0.01, "cap": 0.95, "floor": 0.3}
KEYS = {"safeclip": ("threshold", "step", "cap", "r0"), "estimate": tuple(ESTIMATE_DEFAULTS)}


@dataclass(frozen=True)
class Schedule:
    """A parsed SPEC. `spec` keeps the user's text for the manifest."""

    kind: str
    spec: str
    threshold: float = 0.9
    step: float = 0.01
    cap: float = 0.85
    fraction: float | None = None
    r0: float | None = None
    margin: float | None = None   # estimate only
    floor: float | None = None    # estimate only

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _number(text: str, name: str, spec: str, lo: float = 0.0, hi: float = 1.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ratio schedule {spec!r}: {name} must be a number, got {text!r}") from None
    if not (lo <= value <= hi) or math.isnan(value):
        raise ValueError(f"ratio schedule {spec!r}: {name} must be between {lo} and {hi}, got {value}")
    return value


def parse_schedule(spec: str) -> Schedule:
    """Parse `safeclip[:k=v,...]`, `fraction:F`, `threshold:T` or `estimate[:k=v,...]` (see the module doc)."""
    text = spec.strip()
    name, _, args = text.partition(":")
    name = name.strip().lower()
    if name not in SCHEDULES:
        raise ValueError(f"ratio schedule {spec!r}: unknown kind {name!r}; use one of "
                         "safeclip[:threshold=T,step=S,cap=C,r0=R], fraction:F, threshold:T, "
                         "estimate[:margin=M,cap=C,floor=L]")
    if name in ("fraction", "threshold"):
        if not args.strip():
            raise ValueError(f"ratio schedule {spec!r}: {name} needs a value, e.g. {name}:0.3")
        value = _number(args.strip(), name, spec)
        return (Schedule("fraction", text, fraction=value) if name == "fraction"
                else Schedule("threshold", text, threshold=value))
    params: dict[str, float] = {}
    allowed = KEYS[name]
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in allowed:
            raise ValueError(f"ratio schedule {spec!r}: expected {', '.join(k + '=' for k in allowed)}; "
                             f"got {item!r}")
        if key in params:
            raise ValueError(f"ratio schedule {spec!r}: {key} given twice")
        params[key] = _number(value.strip(), key, spec)
    if name == "estimate":
        params = {**ESTIMATE_DEFAULTS, **params}
        if params["floor"] > params["cap"]:
            raise ValueError(f"ratio schedule {spec!r}: floor {params['floor']} is above cap {params['cap']}")
    return Schedule(name, text, **params)


@dataclass(frozen=True)
class Plan:
    """How many pairs are safe at this epoch, and why."""

    n_safe: int
    ratio: float          # the schedule's target share of safe pairs
    r0: float | None      # SafeCLIP's start ratio (None for the other kinds)
    r0_source: str | None


def round_count(ratio: float, n: int) -> int:
    """ratio * n rounded half up: the number of pairs a share stands for."""
    return min(n, max(0, int(math.floor(ratio * n + 0.5))))


def plan_split(schedule: Schedule, epoch: int, p_clean: np.ndarray, previous_r0: float | None = None,
               previous_source: str | None = None, mismatched: float | None = None) -> Plan:
    """Apply the schedule at `epoch` to this fit's posteriors (`estimate`: and to the
    estimated share of mismatched pairs)."""
    n = int(p_clean.size)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if schedule.kind == "estimate":
        if mismatched is None:
            raise ValueError("the estimate schedule needs the estimated share of mismatched pairs")
        ratio = min(schedule.cap, max(schedule.floor, 1.0 - mismatched - schedule.margin))
        return Plan(round_count(ratio, n), ratio, None, None)
    at_threshold = int(np.count_nonzero(p_clean >= schedule.threshold))
    if schedule.kind == "threshold":
        return Plan(at_threshold, at_threshold / n if n else 0.0, None, None)
    if schedule.kind == "fraction":
        return Plan(round_count(schedule.fraction, n), schedule.fraction, None, None)
    if epoch == 0:
        r0 = at_threshold / n if n else 0.0
        return Plan(at_threshold, r0, r0, f"this fit at p_clean >= {schedule.threshold}")
    if schedule.r0 is not None:
        r0, source = schedule.r0, "the schedule spec"
    elif previous_r0 is not None:
        r0, source = previous_r0, f"previous split {previous_source}"
    else:
        r0 = at_threshold / n if n else 0.0
        source = f"this fit at p_clean >= {schedule.threshold} (no --previous split given)"
    ratio = min(schedule.cap, r0 + epoch * schedule.step)
    return Plan(round_count(ratio, n), ratio, r0, source)
