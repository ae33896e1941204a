"""Augmentations for SafeCLIP's contrastive losses, and the eval transform.

Images: SimCLR-style views as in SafeCLIP (random resized crop, flip, colour
jitter p=0.8, grayscale p=0.2, Gaussian blur), made on whole batches in views.py.
Text: EDA (Wei & Zou 2019) — synonym replacement, random insertion, random
swap, random deletion; alpha 0.1, one operation per view. Synonyms come from
WordNet when its database files are on disk (Debian's `wordnet-base`); without
them the three other operations are used.

Every random choice is driven by an explicit per-sample seed, so a view depends
only on (run seed, epoch, sample) — not on DataLoader workers or on where a
resumed run restarted.
"""

from __future__ import annotations

import mmap
import os
import random
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's inference preprocessing: resize, centre crop, RGB, normalise."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False)


# ---- WordNet, read straight from its database files --------------------------------

WORDNET_POS = ("noun", "verb", "adj", "adv")
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntax markers like "big(a)"


class WordNet:
    """Synonym lookup from WordNet 3.x's `index.*`/`data.*` files.

    The index files are sorted by lemma, so a lookup is a binary search over a
    memory map — no load step, cheap enough to open in every DataLoader worker."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._index: dict[str, mmap.mmap] = {}
        self._data: dict[str, mmap.mmap] = {}
        for pos in WORDNET_POS:
            for kind, store in (("index", self._index), ("data", self._data)):
                with open(self.root / f"{kind}.{pos}", "rb") as f:
                    store[pos] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._cache: dict[str, tuple[str, ...]] = {}

    @classmethod
    def find(cls) -> "WordNet | None":
        """The first WordNet database found ($WNSEARCHDIR, $WNHOME/dict, Debian's
        path), or None when none is installed."""
        candidates = [os.environ.get("WNSEARCHDIR"),
                      os.path.join(os.environ["WNHOME"], "dict") if os.environ.get("WNHOME") else None,
                      "/usr/share/wordnet"]
        for root in candidates:
            if root and all(os.path.isfile(os.path.join(root, f"{k}.{p}"))
                            for k in ("index", "data") for p in WORDNET_POS):
                try:
                    return cls(root)
                except (OSError, ValueError):
                    continue
        return None

    def _index_line(self, pos: str, lemma: bytes) -> bytes | None:
        mm = self._index[pos]
        lo, hi = 0, len(mm)
        while lo < hi:
            mid = (lo + hi) // 2
            start = mm.rfind(b"\n", 0, mid) + 1
            end = mm.find(b"\n", start)
            end = len(mm) if end < 0 else end
            key = mm[start:end].split(b" ", 1)[0]  # licence header lines start with a space: key b""
            if key < lemma:
                lo = end + 1
            elif key > lemma:
                hi = start
            else:
                return mm[start:end]
        return None

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        mm = self._data[pos]
        end = mm.find(b"\n", offset)
        fields = mm[offset:end].decode("utf-8", "replace").split(" ")
        count = int(fields[3], 16)
        return [_MARKER.sub("", fields[4 + 2 * i]) for i in range(count)]

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Synonyms of `word` across parts of speech, most frequent sense first;
        multi-word lemmas come back with spaces."""
        word = word.lower()
        if word in self._cache:
            return self._cache[word]
        found: list[str] = []
        lemmas = [word] + ([word[:-1]] if word.endswith("s") and len(word) > 3 else [])
        for lemma in lemmas:
            key = lemma.replace(" ", "_").encode("utf-8")
            for pos in WORDNET_POS:
                line = self._index_line(pos, key)
                if line is None:
                    continue
                fields = line.decode("utf-8").split()
                synset_count, pointer_count = int(fields[2]), int(fields[3])
                offsets = fields[6 + pointer_count: 6 + pointer_count + synset_count]
                for offset in offsets:
                    for synonym in self._synset_words(pos, int(offset)):
                        synonym = synonym.replace("_", " ").lower()
                        if synonym not in (word, lemma) and synonym not in found:
                            found.append(synonym)
            if found:
                break
        self._cache[word] = tuple(found)
        return self._cache[word]

    def __getstate__(self) -> dict:  # mmaps do not pickle; DataLoader workers reopen
        return {"root": str(self.root)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])


# ---- EDA ---------------------------------------------------------------------------

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should
so some such than that the their theirs them themselves then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your
yours yourself yourselves
""".split())

EDA_OPS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


def _bare(word: str) -> str:
    return re.sub(r"[^a-z0-9'-]", "", word.lower())


class EDA:
    """Easy Data Augmentation for captions: one randomly chosen operation per view,
    changing about `alpha` of the words (at least one)."""

    def __init__(self, alpha: float = 0.1, wordnet: "WordNet | None | str" = "auto",
                 ops: Sequence[str] | None = None):
        self.alpha = alpha
        self.wordnet = WordNet.find() if wordnet == "auto" else wordnet
        available = EDA_OPS if self.wordnet is not None else tuple(o for o in EDA_OPS if o != "synonym_replacement")
        self.ops = tuple(ops) if ops is not None else available
        unknown = [o for o in self.ops if o not in EDA_OPS]
        if unknown:
            raise ValueError(f"unknown EDA operation(s): {', '.join(unknown)}")
        if "synonym_replacement" in self.ops and self.wordnet is None:
            raise ValueError("synonym replacement needs WordNet, which was not found")

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if not words:
            return text
        op = rng.choice(self.ops)
        n = max(1, int(self.alpha * len(words)))
        return " ".join(getattr(self, op)(words, n, rng))

    def views(self, text: str, seed: int, n: int = 2) -> list[str]:
        rng = random.Random(seed)
        return [self(text, rng) for _ in range(n)]

    def _synonyms(self, word: str) -> tuple[str, ...]:
        bare = _bare(word)
        if self.wordnet is None or not bare or bare in STOPWORDS:
            return ()
        return self.wordnet.synonyms(bare)

    def synonym_replacement(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        candidates = sorted({_bare(w) for w in words} - STOPWORDS - {""})
        rng.shuffle(candidates)
        out, replaced = list(words), 0
        for bare in candidates:
            synonyms = self._synonyms(bare)
            if not synonyms:
                continue
            choice = rng.choice(synonyms)
            out = [choice if _bare(w) == bare else w for w in out]
            replaced += 1
            if replaced >= n:
                break
        return out

    def random_insertion(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        """Insert a synonym of a random word (EDA); without WordNet, a copy of one."""
        out = list(words)
        for _ in range(n):
            new = None
            for _ in range(10):
                synonyms = self._synonyms(rng.choice(words))
                if synonyms:
                    new = rng.choice(synonyms)
                    break
            if new is None:
                new = rng.choice(words)
            out.insert(rng.randint(0, len(out)), new)
        return out

    def random_swap(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        out = list(words)
        if len(out) < 2:
            return out
        for _ in range(n):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out

    def random_deletion(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        """Drop each word with probability alpha, keeping at least one."""
        if len(words) == 1:
            return list(words)
        out = [w for w in words if rng.random() > self.alpha]
        return out or [rng.choice(words)]
