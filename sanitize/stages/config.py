"""Every stage's options as data: the library's defaults, which the CLI shows and
passes on. Nothing heavy is imported here, so `safeclip --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float16", "float32")


@dataclass
class EmbedConfig:
    """`safeclip embed`'s options (the CLI's defaults come from here)."""

    batch_size: int = 256
    dtype: str = "float16"
    augment: bool = False
    workers: int = 2
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose float16 or float32")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.workers < 0:
            raise ValueError("--workers must be >= 0")
