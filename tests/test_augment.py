"""Image views and EDA: seeded, sized to the model, and WordNet optional."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from sanitize.train.augment import EDA, EDA_OPS, WordNet, eval_transform
from sanitize.train.views import COL, PARAMS, BatchViews, base_image, blur_kernel, draw_view_params

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


def test_view_params_are_seeded_and_follow_simclr_probabilities():
    a, b = draw_view_params(7, 28, (0.5, 1.0)), draw_view_params(7, 28, (0.5, 1.0))
    other = draw_view_params(8, 28, (0.5, 1.0))
    assert a.shape == (2, len(PARAMS)) and np.array_equal(a, b) and not np.array_equal(a, other)
    assert not np.array_equal(a[0], a[1])  # two different views of one image
    rows = np.concatenate([draw_view_params(seed, 28, (0.5, 1.0)) for seed in range(3000)])
    assert abs(rows[:, COL["flip"]].mean() - 0.5) < 0.03 and abs(rows[:, COL["jitter"]].mean() - 0.8) < 0.03
    assert abs(rows[:, COL["gray"]].mean() - 0.2) < 0.03 and abs(rows[:, COL["blur"]].mean() - 0.5) < 0.03
    area = rows[:, COL["w"]] * rows[:, COL["h"]] / 28 ** 2
    assert area.min() >= 0.5 - 0.06 and area.max() <= 1.0  # crop scale (0.5, 1), up to rounding
    assert (rows[:, COL["x"]] + rows[:, COL["w"]] <= 28).all() and (rows[:, COL["y"]] + rows[:, COL["h"]] <= 28).all()
    orders = rows[:, COL["order0"]:COL["order3"] + 1]
    assert (np.sort(orders, axis=1) == np.arange(4)).all() and len({tuple(o) for o in orders}) == 24
    assert (np.abs(rows[:, COL["brightness"]:COL["saturation"] + 1] - 1) <= 0.5).all()
    assert (np.abs(rows[:, COL["hue"]]) <= 0.1).all()


def _normalised(x):
    from open_clip.constants import OPENAI_DATASET_MEAN as mean, OPENAI_DATASET_STD as std

    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_batch_views_apply_each_images_own_parameters():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    x = images.float() / 255
    neutral = np.zeros((4, 1, len(PARAMS)), np.float32)
    neutral[..., COL["w"]] = neutral[..., COL["h"]] = 16
    views = BatchViews(16)
    same = views(images, torch.from_numpy(neutral))[0]
    assert torch.allclose(same, _normalised(x), atol=1e-4)  # the whole image, nothing else: the image

    p = neutral.copy()
    p[1, 0, COL["flip"]] = 1
    p[2, 0, COL["gray"]] = 1
    p[3, 0, COL["jitter"]], p[3, 0, COL["brightness"]:COL["hue"] + 1] = 1, (0.5, 1, 1, 0)
    p[3, 0, COL["order0"]:COL["order3"] + 1] = (3, 0, 2, 1)
    out = views(images, torch.from_numpy(p))[0]
    assert torch.allclose(out[0], same[0], atol=1e-6)  # image 0 untouched by the others' parameters
    assert torch.allclose(out[1], same[1].flip(-1), atol=1e-6)
    gray = out[2] * torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1) + torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    assert torch.allclose(out[3], _normalised(x[3:4] * 0.5)[0], atol=1e-5)  # brightness 0.5 halves it

    crop = neutral.copy()
    crop[0, 0, [COL["x"], COL["y"], COL["w"], COL["h"]]] = (4, 2, 8, 8)
    zoomed = views(images, torch.from_numpy(crop))[0][0]
    corner = _normalised(x[:1, :, 2:10, 4:12])[0]
    assert torch.allclose(zoomed[:, 0, 0], corner[:, 0, 0], atol=1e-5)  # box corners map to output corners
    assert torch.allclose(zoomed[:, -1, -1], corner[:, -1, -1], atol=1e-5)

    blur = neutral.copy()
    blur[0, 0, COL["blur"]], blur[0, 0, COL["sigma"]] = 1, 2.0
    assert views(images, torch.from_numpy(blur))[0][0].std() < same[0].std()  # smoother


def test_batch_views_do_not_depend_on_the_batch_or_threads():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 28, 28), dtype=np.uint8))
    params = torch.from_numpy(np.stack([draw_view_params(seed, 28, (0.5, 1.0)) for seed in range(6)]))
    views = BatchViews(28)
    whole = views(images, params)
    torch.set_num_threads(2)
    try:
        alone = [views(images[i:i + 1], params[i:i + 1]) for i in range(6)]
    finally:
        torch.set_num_threads(1)
    for i in range(6):
        assert torch.equal(whole[0][i], alone[i][0][0]) and torch.equal(whole[1][i], alone[i][1][0])
    assert whole[0].shape == (6, 3, 28, 28) and not torch.equal(whole[0], whole[1])


def test_base_image_is_a_model_size_rgb_square():
    wide = Image.fromarray(np.arange(40 * 80, dtype=np.uint32).reshape(40, 80).astype(np.uint8), "L")
    square = base_image(wide, 20)
    assert square.shape == (3, 20, 20) and square.dtype == np.uint8
    assert (square[0] == square[1]).all()  # gray to RGB
    assert blur_kernel(28) == 3 and blur_kernel(224) == 23  # ~10% of the side, odd (SimCLR)


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
