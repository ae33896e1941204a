"""open_clip's own trainer with safeclip's model configs: `python -m sanitize.models.open_clip_main ARGS`.

The same as `python -m open_clip_train.main ARGS` (needs the train extra:
`pip install 'safeclip[train]'`), except that `--model` also takes safeclip's shipped
configs (safeclip-tiny-vit, safeclip-small-vit) and any model config `.json` path, which
are registered with open_clip first. Its `epoch_N.pt` files load back with
`safeclip embed/eval --model NAME --pretrained .../checkpoints/epoch_N.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .factory import CONFIG_DIR


def register_configs(argv: list[str]) -> list[str]:
    """Register the shipped configs and a `--model X.json`; returns argv with the model's name."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    argv = list(argv)
    for i, arg in enumerate(argv):
        value, prefix = (argv[i + 1], None) if arg == "--model" and i + 1 < len(argv) else (
            (arg.split("=", 1)[1], "--model=") if arg.startswith("--model=") else (None, None))
        if value and value.endswith(".json"):
            path = Path(value)
            if not path.is_file():
                raise SystemExit(f"error: {value}: model config file not found")
            open_clip.add_model_config(path)
            if prefix:
                argv[i] = prefix + path.stem
            else:
                argv[i + 1] = path.stem
    return argv


def main(argv: list[str] | None = None) -> None:
    try:
        from open_clip_train.main import main as train_main
    except ImportError as exc:
        raise SystemExit(f"error: open_clip's trainer is not installed ({exc}); pip install 'safeclip[train]'")
    train_main(register_configs(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
