"""Prompts and class names for zero-shot evaluation.

Zero-shot accuracy is only honest when the prompts are not the captions the model
was trained on. The default templates are in the style of CLIP's ImageNet prompt
ensemble ("a bad photo of the {}.", ...) and deliberately avoid every phrasing of
`sanitize.fashion_mnist.CAPTION_TEMPLATES` (the tests check that no rendered
prompt equals a rendered training caption).

Class names come from a built-in set (`fashion-mnist`), a text file (one name a
line), or a comma-separated list; each may carry the words prompts use for it
(`trouser=trousers`). Templates come from a text file (one a line, each with
exactly one `{}`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io.fashion_mnist import FASHION_MNIST_CLASSES

# Quality, lighting, size and framing variations of "a photo of the {}.", as in CLIP's
# prompt ensembles; averaging over them smooths out any one phrasing's bias. "the"
# rather than "a" so plural class names ("the ankle boots") read naturally.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a blurry photo of the {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a drawing of the {}.",
    "a rendering of the {}.",
    "a pixelated photo of the {}.",
    "a grayscale photo of the {}.",
    "itap of my {}.",
    "there is the {} in the scene.",
    "this is the {} in the picture.",
    "a product shot of the {}.",
)

# The words a prompt uses for each Fashion-MNIST class: everyday names, plural for
# what is sold in pairs. The label names ("trouser", "sandal", "sneaker") are not how
# anyone writes about these items — they tokenise to words a caption-trained model
# never saw, and measured on a trained tiny ViT they took zero-shot accuracy from 77%
# to 51% (those three classes at 0-4%).
FASHION_MNIST_PROMPT_NAMES: tuple[str, ...] = (
    "t-shirt", "trousers", "pullover", "dress", "coat",
    "sandals", "shirt", "sneakers", "bag", "ankle boots",
)


@dataclass(frozen=True)
class ClassSet:
    """Class names (labels, manifest classes, tables) and the words prompts use for them."""

    names: tuple[str, ...]
    prompt_names: tuple[str, ...]


BUILTIN_CLASSES: dict[str, ClassSet] = {
    "fashion-mnist": ClassSet(FASHION_MNIST_CLASSES, FASHION_MNIST_PROMPT_NAMES),
}


def check_templates(templates: list[str] | tuple[str, ...], where: str = "templates") -> list[str]:
    """Validate templates: non-empty, each with exactly one `{}` (and no other fields)."""
    out = [t for t in (t.strip() for t in templates) if t]
    if not out:
        raise ValueError(f"{where}: no templates")
    for template in out:
        if template.count("{}") != 1:
            raise ValueError(f"{where}: template {template!r} needs exactly one {{}} for the class name")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"{where}: template {template!r} has braces other than one {{}}")
    return out


def load_templates(path: str | os.PathLike | None = None) -> list[str]:
    """The default templates, or those in `path` (one a line; blank lines and `#` lines skipped)."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    lines = _read_lines(path, "templates file")
    return check_templates(lines, str(path))


def load_classes(spec: str) -> ClassSet:
    """Classes from a built-in set name, a file (one a line) or a comma list, in label
    order. An entry `name=words` prompts with `words` (e.g. `trouser=trousers`)."""
    spec = spec.strip()
    if spec in BUILTIN_CLASSES:
        return BUILTIN_CLASSES[spec]
    if os.path.isfile(spec):
        entries = _read_lines(spec, "classes file")
    elif "," in spec:
        entries = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        raise ValueError(f"--classes {spec!r}: not a built-in set ({', '.join(BUILTIN_CLASSES)}), "
                         f"an existing file, or a comma-separated list")
    pairs = [tuple(part.strip() for part in e.split("=", 1)) if "=" in e else (e, e) for e in entries]
    if any(not name or not words for name, words in pairs):
        raise ValueError(f"--classes {spec!r}: an entry name=words needs both sides")
    names = [name for name, _ in pairs]
    if len(names) < 2:
        raise ValueError(f"--classes {spec!r}: zero-shot classification needs at least 2 class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--classes {spec!r}: duplicate class name(s): {', '.join(duplicates)}")
    return ClassSet(tuple(names), tuple(words for _, words in pairs))


def prompts(prompt_names: list[str] | tuple[str, ...], templates: list[str]) -> list[str]:
    """Every (class, template) prompt, class-major: prompt c * T + t."""
    return [template.format(name) for name in prompt_names for template in templates]


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc})")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
