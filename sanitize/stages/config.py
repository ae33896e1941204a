"""Every stage's options as data: the library's defaults, which the CLI shows and
passes on. Nothing heavy is imported here, so `safeclip --help` stays fast."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DTYPES = ("float16", "float32")


@dataclass
class EmbedConfig:
    """`safeclip embed`'s options (the CLI's defaults come from here)."""

    batch_size: int = 256
    dtype: str = "float16"
    augment: bool = False
    workers: int | None = None      # None: half the cores (train/distributed.py's policy)
    threads: int = 0                # 0: the cores the workers leave free, or $OMP_NUM_THREADS
    device: str = "auto"
    seed: int = 0
    duplicate_keys: str = "error"  # or "rename" (sanitize/io/pairs.py)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose float16 or float32")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if self.seed < 0:
            raise ValueError("--seed must be >= 0")
        if self.duplicate_keys not in ("error", "rename"):
            raise ValueError(f"unknown --duplicate-keys {self.duplicate_keys!r}; choose error or rename")


@dataclass
class WarmupConfig:
    """Every knob of SafeCLIP's phases 1–2 (`safeclip warmup`, and the warm-up of
    `safeclip pretrain`); saved in the checkpoint so a resume replays it exactly."""

    model: str = "safeclip-tiny-vit"
    pretrained: str | None = None
    unimodal_epochs: int = 5
    clip_epochs: int = 1
    batch_size: int = 128
    lr: float = 5e-4
    clip_lr_scale: float = 0.01
    weight_decay: float = 0.1
    warmup_steps: int | None = None     # per phase; None: 10% of the phase's steps
    min_lr: float = 0.0
    temperature: float = 0.1             # unimodal InfoNCE temperature (SimCLR/NNCLR's 0.1)
    memory_bank: int = 4096              # NNCLR bank size per modality; 0 = in-batch InfoNCE
    eda_alpha: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    shuffle_buffer: int = 2000
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WarmupConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)

    def validate(self) -> None:
        if self.unimodal_epochs < 0 or self.clip_epochs < 0 or self.unimodal_epochs + self.clip_epochs == 0:
            raise ValueError("need at least one unimodal or CLIP epoch (and none negative)")
        if self.batch_size < 2:
            raise ValueError("batch size must be >= 2 for contrastive losses")
        self.validate_numbers()
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError("precision must be auto, fp32, bf16 or fp16")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop scale must satisfy 0 < low <= high <= 1")
        if self.num_workers < 0:
            raise ValueError("--workers must be >= 0")

    def validate_numbers(self) -> None:
        """The numeric options' ranges (NaN and infinity included), shared with pretrain."""
        if not all(0 < v < math.inf for v in (self.lr, self.clip_lr_scale, self.temperature)):
            raise ValueError("lr, clip-lr-scale and temperature must be > 0 (and finite)")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.min_lr < math.inf):
            raise ValueError("weight decay and min lr must be >= 0 (and finite)")
        if not 0 <= self.eda_alpha <= 1:
            raise ValueError("EDA alpha must be in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError("--warmup-steps must be >= 0")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError("--grad-clip must be > 0 (and finite)")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle buffer must be >= 0")
        if self.memory_bank < 0:
            raise ValueError("memory bank size must be >= 0")


# Presets fill in options the user did not give. "paper": the official SafeCLIP
# defaults, its loop (`--defense safeclip`) included. "cpu": the shipped tiny ViT sized so a run over 60k Fashion-MNIST pairs
# fits a short CPU budget (see docs/performance.md); a larger CLIP warm-up factor
# because one CLIP epoch of 118 steps at 0.01 x lr barely aligns the towers.
PRESETS: dict[str, dict] = {
    "paper": dict(defense="safeclip", model="RN50", batch_size=128, lr=5e-4, weight_decay=0.1, warmup_steps=10_000, epochs=32,
                  unimodal_epochs=5, clip_epochs=1, clip_lr_scale=0.01, memory_bank=4096),
    "cpu": dict(model="safeclip-tiny-vit", batch_size=512, lr=1e-3, weight_decay=0.1, warmup_steps=10, epochs=3,
                unimodal_epochs=1, clip_epochs=1, clip_lr_scale=0.1, memory_bank=4096),
}


@dataclass
class PretrainConfig:
    """`safeclip pretrain`: phase 1–2 settings in `warmup` (a WarmupConfig, shared with
    `safeclip warmup`), the rest is phase 3. Saved in every checkpoint so a resume replays it.
    `ratio_schedule` None takes the defense's own default."""

    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    epochs: int = 32
    defense: str = "resplit"  # measured both safe and accurate (docs/results.md); the paper's: "safeclip"
    ratio_schedule: str | None = None
    ranking: str = "global"
    clip_views: str = "auto"
    risky_loss: str = "auto"             # auto: the defense's own (unimodal for safeclip)
    dedup_tau: float | None = None       # None: the defense's own; 0: no near-duplicate grouping
    score_from_training: bool | None = None  # None: the defense's own
    fit_sample: int = 1_000_000
    score_batch_size: int = 256
    score_dtype: str = "float16"
    local_loss: bool = False
    keep: int = 2
    eval_every: int = 0
    eval_test: str | None = None
    eval_classes: str = "fashion-mnist"

    def to_dict(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "warmup"}
        data["warmup"] = self.warmup.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"warmup"}
        return cls(warmup=WarmupConfig.from_dict(data.get("warmup", {})),
                   **{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        """The checks every defense shares; `Defense.validate` adds its own."""
        from ..defenses import make_defense
        from ..defenses.schedule import parse_schedule
        from ..models.factory import resolve_config

        if self.warmup.batch_size < 2:
            raise ValueError("batch size must be >= 2 for contrastive losses")
        self.warmup.validate_numbers()
        if self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if self.ratio_schedule is not None:
            parse_schedule(self.ratio_schedule)
        if self.ranking not in ("global", "balanced"):
            raise ValueError(f"unknown ranking {self.ranking!r}; choose global or balanced")
        if self.clip_views not in ("auto", "plain", "cross"):
            raise ValueError(f"unknown --clip-views {self.clip_views!r}; choose auto, plain or cross")
        if self.risky_loss not in ("auto", "unimodal", "none"):
            raise ValueError(f"unknown --risky-loss {self.risky_loss!r}; choose auto, unimodal or none")
        if self.dedup_tau is not None and not 0 <= self.dedup_tau <= 1:
            raise ValueError(f"--dedup-tau must be between 0 (off) and 1, got {self.dedup_tau}")
        if self.score_dtype not in DTYPES:
            raise ValueError(f"unknown score dtype {self.score_dtype!r}; choose float16 or float32")
        if self.keep < 1:
            raise ValueError("--keep must be >= 1")
        if self.fit_sample < 2:
            raise ValueError(f"--fit-sample must be at least 2, got {self.fit_sample}")
        if self.score_batch_size < 1:
            raise ValueError("score batch size must be >= 1")
        if self.eval_every < 0:
            raise ValueError("--eval-every must be >= 0")
        if self.eval_every and not self.eval_test:
            raise ValueError("--eval-every needs --eval-test (a pair source with class labels)")
        if self.warmup.num_workers < 0:
            raise ValueError("--workers must be >= 0")
        make_defense(self)  # the defense's own checks
        resolve_config(self.warmup.model)  # unknown model: a clear error before any work

    @classmethod
    def from_options(cls, preset: str | None = None, **options) -> "PretrainConfig":
        """A config from command-line options: the preset's value for every option left
        None, then the dataclass defaults. Options of both WarmupConfig and this class."""
        given = {k: v for k, v in options.items() if v is not None}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            given = {**PRESETS[preset], **given}
        warmup_fields = {f.name for f in dataclasses.fields(WarmupConfig)}
        own = {f.name for f in dataclasses.fields(cls)} - {"warmup"}
        unknown = set(given) - warmup_fields - own
        if unknown:
            raise TypeError(f"unknown pretrain option(s): {', '.join(sorted(unknown))}")
        warmup = WarmupConfig(**{k: v for k, v in given.items() if k in warmup_fields})
        return cls(warmup=warmup, **{k: v for k, v in given.items() if k in own})


@dataclass
class DemoConfig:
    """What the demo runs. The warm-up and the split are sized for its 5,150 pairs (~20 steps an
    epoch at batch 256), as measured with benchmarks/demo_warmup.py (docs/pipeline.md):

    - Warm-up: no unimodal epoch and 3 CLIP epochs at 0.5 x lr. The paper's 0.01 x lr assumes
      CC3M's ~20k steps an epoch; here it barely aligns the towers (docs/performance.md). At
      full rate the towers align but 3 epochs already learn BadNet's trigger (a BadNet poison
      in the top 0.1% of pairs); a unimodal epoch in front made the split worse at equal time.
    - Split: `fraction:0.3`, a fixed 30% safe set, not the paper's first-split rule
      (p_clean >= 0.9). After this short warm-up the rule's cut does not track the poisons: it
      made 6% of the pairs safe with the old warm-up and 83% with this one, while the first
      poison sits near 40%. SafeCLIP grows the safe set from its first split anyway; issue 17
      is working out a start rule for every data size, and the demo will take it up then.
    """

    out: str = "safeclip-demo"
    seed: int = 0
    badnet_count: int = 50          # 1% of the 5,000 sample pairs
    badnet_target: str = "trouser"
    targets: int = 4                # targeted poisoning: images from the sample's test set ...
    copies: int = 25                # ... each added this many times with a wrong class's captions
    unimodal_epochs: int = 0
    clip_epochs: int = 3
    clip_lr_scale: float = 0.5
    batch_size: int = 256
    lr: float = 1e-3
    schedule: str = "fraction:0.3"
    dedup_tau: float = 0.9999        # at most one pair of each near-duplicate image group is safe, as resplit
    workers: int = 2
    threads: int | None = None      # torch threads for the warm-up; None: one per core but one
