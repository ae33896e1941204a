"""`safeclip report`: the HTML holds the histogram with the fit and the cut, the most risky
pairs with real thumbnails from the source, and correct detection metrics."""

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from emb_synth import mixture_similarities, write_emb
from sanitize.io.pairs import Pair
from sanitize.stages.report import build_report
from sanitize.io.shards import ShardWriter
from sanitize.stages.split import split

PER_SHARD = 120


class _Collect(HTMLParser):
    """Tags with attributes, plus the text, of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, cls=None):
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def _image(i: int) -> Image.Image:
    """A 28x28 image whose pixels encode i, so a thumbnail can be traced to its pair."""
    return Image.fromarray(np.full((28, 28), i % 251, np.uint8), mode="L")


def _setup(tmp_path, truth=True):
    src = tmp_path / "src"
    keys, captions = {}, {}
    with ShardWriter(src, PER_SHARD) as writer:
        for i in range(2 * PER_SHARD):
            key = f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}"
            keys.setdefault(key[:5], []).append(key)
            captions.setdefault(key[:5], []).append(f"caption <{i}> & more")
            buf = io.BytesIO()
            _image(i).save(buf, "PNG")
            writer.write(Pair(key, f"caption <{i}> & more", _image(i), buf.getvalue(), "png", {}))
    rng = np.random.default_rng(0)
    sims = {name: mixture_similarities(PER_SHARD, rng) for name in keys}
    sims["00001"][:12] = np.linspace(-0.3, -0.2, 12)  # twelve clear outliers: the most risky
    all_keys = keys["00000"] + keys["00001"]
    if truth:
        attack = [None] * len(all_keys)
        kind = ["clean"] * len(all_keys)
        for j in range(8):  # 8 badnet poisons among the outliers, 4 tdpa hidden among clean pairs
            attack[PER_SHARD + j], kind[PER_SHARD + j] = "badnet", "poison"
        for j in range(4):
            attack[j], kind[j] = "tdpa", "poison"
        pq.write_table(pa.table({"key": all_keys, "attack": attack, "kind": kind}), src / "manifest.parquet")
    emb = write_emb(tmp_path / "emb", sims, keys=keys, captions=captions, source=str(src))
    part = tmp_path / "part"
    split(emb, part, "fraction:0.75")
    return part, src, sims


def test_report_has_histogram_fit_cut_and_thumbnails(tmp_path):
    part, src, sims = _setup(tmp_path)
    page, data = build_report(part, top=10, bins=30)
    doc = _Collect()
    doc.feed(page)
    svgs = doc.find("svg", "histogram")
    assert len(svgs) == 1
    bars = doc.find("rect", "bar")
    assert len(doc.find("rect", "risky")) == len(doc.find("rect", "safe")) == 30 and len(bars) == 60
    assert len(doc.find("path", "component")) == 2 and len(doc.find("line", "threshold")) == 1
    # Bar heights are proportional to counts: the bins add up to every pair.
    assert data.safe_counts.sum() == 180 and data.risky_counts.sum() == 60
    # The ten most risky pairs, in rank order, each with a decodable thumbnail of *its* image.
    cards = doc.find("div", "pair")
    assert [c["data-key"] for c in cards] == [f"00001{j:04d}" for j in range(10)]
    images = doc.find("img")
    assert len(images) == 10
    for card, img in zip(cards, images):
        assert img["src"].startswith("data:image/png;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert thumb.size == (84, 84)  # 28 px scaled up 3x, nearest neighbour
        i = PER_SHARD + int(card["data-key"][5:])
        assert set(np.asarray(thumb.convert("L")).ravel()) == {i % 251}
    text = "".join(doc.text)
    assert "caption <120> & more" in text  # captions shown, escaped
    assert "<120>" not in page
    assert not re.search(r'(src|href)="(http|//)', page)  # self-contained


def test_report_detection_metrics(tmp_path):
    part, _, _ = _setup(tmp_path)
    _, data = build_report(part, top=0)
    by_name = {r["name"]: r for r in data.detection}
    risky_keys = set(pq.read_table(part / "risky" / "00000.parquet").column("key").to_pylist()
                     + pq.read_table(part / "risky" / "00001.parquet").column("key").to_pylist())
    assert len(risky_keys) == 60
    badnet_in = sum(f"00001{j:04d}" in risky_keys for j in range(8))
    tdpa_in = sum(f"00000{j:04d}" in risky_keys for j in range(4))
    assert badnet_in == 8  # the outliers are all risky
    assert by_name["badnet"]["recall"] == pytest.approx(badnet_in / 8)
    assert by_name["badnet"]["precision"] == pytest.approx(badnet_in / 60)
    assert by_name["tdpa"]["in_risky"] == tdpa_in and by_name["tdpa"]["in_safe"] == 4 - tdpa_in
    assert by_name["all poisons"]["recall"] == pytest.approx((badnet_in + tdpa_in) / 12)
    assert "clean" not in by_name


def test_report_without_truth_or_source(tmp_path):
    part, src, _ = _setup(tmp_path, truth=False)
    page, data = build_report(part, top=5)
    assert data.detection is None and any("manifest" in n for n in data.notes)
    assert len(_images(page)) == 5
    for tar in src.glob("*.tar"):
        tar.unlink()
    page, data = build_report(part, top=5)
    assert len(_images(page)) == 0 and page.count('class="noimg"') == 5
    assert any("thumbnails" in n for n in data.notes)


def _images(page):
    doc = _Collect()
    doc.feed(page)
    return doc.find("img")


def test_cli_report(tmp_path):
    part, _, _ = _setup(tmp_path)
    out = tmp_path / "r" / "report.html"
    r = CliRunner().invoke(app, ["report", str(part), "--out", str(out), "--top", "6"])
    assert r.exit_code == 0, r.output
    assert "6 with thumbnails" in r.output and "recall" in r.output
    assert len(_images(out.read_text())) == 6
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(out)])
    assert r.exit_code != 0 and "Traceback" not in r.output and "error" in r.output
