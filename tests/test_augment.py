"""Image views and EDA: seeded, sized to the model, and WordNet optional."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from sanitize.train.augment import EDA, EDA_OPS, ImageViews, WordNet, eval_transform, train_transform

HEADER = "  1 This is a licence header line that sorts before every lemma  \n  2 second line  \n"


def write_wordnet(root, synsets: dict[str, list[list[str]]]) -> None:
    """A tiny WordNet database in the real file format: synsets[pos] = [[lemma, ...], ...]."""
    root.mkdir(parents=True, exist_ok=True)
    for pos, tag in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        data = HEADER.encode()
        index: dict[str, list[int]] = {}
        for words in synsets.get(pos, []):
            offset = len(data)
            fields = [f"{offset:08d}", "00", tag, f"{len(words):02x}"]
            for w in words:
                fields += [w + ("(a)" if tag == "a" else ""), "0"]
                index.setdefault(w.lower(), []).append(offset)
            data += (" ".join(fields + ["000", "|", "gloss"]) + "  \n").encode()
        (root / f"data.{pos}").write_bytes(data)
        lines = [f"{lemma} {tag} {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  "
                 for lemma, offs in sorted(index.items())]
        (root / f"index.{pos}").write_text(HEADER + "".join(line + "\n" for line in lines))


@pytest.fixture
def tiny_wordnet(tmp_path):
    write_wordnet(tmp_path / "wn", {
        "noun": [["coat", "jacket"], ["boot", "kick"], ["shirt"], ["sneaker", "gym_shoe"], ["apple"]],
        "adj": [["dark", "dim"], ["zesty"]],
    })
    return WordNet(tmp_path / "wn")


def gray_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8), "L")


def test_eval_transform_makes_rgb_at_model_size_without_randomness():
    transform = eval_transform(28)
    image = gray_image(0)
    a, b = transform(image), transform(image)
    assert a.shape == (3, 28, 28) and torch.equal(a, b)
    from open_clip.constants import OPENAI_DATASET_MEAN as mean, OPENAI_DATASET_STD as std
    raw = [a[c] * std[c] + mean[c] for c in range(3)]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)  # gray -> RGB


def test_image_views_are_seeded_sized_and_leave_global_rng_alone():
    views = ImageViews(28)
    image = gray_image(1)
    torch.manual_seed(123)
    v = views(image, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the global generator was not advanced
    again = views(image, seed=7)
    other = views(image, seed=8)
    assert len(v) == 2 and v[0].shape == (3, 28, 28)
    assert torch.equal(v[0], again[0]) and torch.equal(v[1], again[1])
    assert not torch.equal(v[0], v[1])  # two different views of one image
    assert not torch.equal(v[0], other[0])


def test_train_transform_blur_kernel_scales_with_image_size():
    small = [t for t in train_transform(28).transforms if hasattr(t, "transforms")]
    big = [t for t in train_transform(224).transforms if hasattr(t, "transforms")]
    blur = lambda ts: [x for t in ts for x in t.transforms if type(x).__name__ == "GaussianBlur"][0]  # noqa: E731
    assert blur(small).kernel_size == (3, 3)
    assert blur(big).kernel_size == (23, 23)


def test_wordnet_reader_finds_synonyms_in_real_file_format(tiny_wordnet):
    assert set(tiny_wordnet.synonyms("coat")) == {"jacket"}
    assert set(tiny_wordnet.synonyms("Coats")) == {"jacket"}  # plural falls back to the lemma
    assert set(tiny_wordnet.synonyms("sneaker")) == {"gym shoe"}
    assert set(tiny_wordnet.synonyms("dark")) == {"dim"}  # adjective marker "(a)" stripped
    assert tiny_wordnet.synonyms("shirt") == ()  # a synset of one word has no synonyms
    assert tiny_wordnet.synonyms("zzz") == () and tiny_wordnet.synonyms("a") == ()
    import pickle
    assert set(pickle.loads(pickle.dumps(tiny_wordnet)).synonyms("boot")) == {"kick"}


@pytest.mark.skipif(WordNet.find() is None, reason="no WordNet database installed")
def test_installed_wordnet_has_common_synonyms():
    assert "handbag" in WordNet.find().synonyms("bag")


def test_eda_with_wordnet_replaces_synonyms_one_op_per_view(tiny_wordnet):
    eda = EDA(alpha=0.1, wordnet=tiny_wordnet, ops=["synonym_replacement"])
    out = eda("a dark coat", random.Random(0))
    assert out != "a dark coat" and out.split()[0] == "a"
    assert out in {"a dim coat", "a dark jacket"}  # exactly one word (alpha*3 -> at least 1)
    inserted = EDA(wordnet=tiny_wordnet, ops=["random_insertion"])("a coat", random.Random(1)).split()
    assert len(inserted) == 3 and "jacket" in inserted
    assert set(EDA(wordnet=tiny_wordnet).ops) == set(EDA_OPS)


def test_eda_without_wordnet_uses_the_other_three_operations():
    eda = EDA(wordnet=None)
    assert set(eda.ops) == {"random_insertion", "random_swap", "random_deletion"}
    with pytest.raises(ValueError):
        EDA(wordnet=None, ops=["synonym_replacement"])
    words = "a photo of a dark ankle boot on a white background".split()
    rng = random.Random(3)
    swapped = EDA(wordnet=None).random_swap(words, 1, rng)
    assert Counter(swapped) == Counter(words) and swapped != words
    inserted = EDA(wordnet=None).random_insertion(words, 1, rng)
    assert len(inserted) == len(words) + 1 and set(inserted) == set(words)
    deleted = [EDA(alpha=0.5, wordnet=None).random_deletion(words, 1, random.Random(s)) for s in range(20)]
    assert all(1 <= len(d) < len(words) for d in deleted)
    assert EDA(wordnet=None).random_deletion(["one"], 1, rng) == ["one"]


def test_eda_views_are_seeded_and_change_about_alpha_of_the_words():
    eda = EDA(wordnet=None)
    caption = "a photo of a dark ankle boot on a white background with soft light"
    assert eda.views(caption, seed=5) == eda.views(caption, seed=5)
    many = [v for s in range(50) for v in eda.views(caption, seed=s)]
    assert len(set(many)) > 10
    n = len(caption.split())
    # one operation per view, n_changed = max(1, int(0.1 * n)) = 1 word for insertion
    assert all(abs(len(v.split()) - n) <= n for v in many)
    assert any(len(v.split()) == n + 1 for v in many)
