"""Reading one shard in lanes (io/pairs.py): the lanes together yield exactly the pairs of
a whole read, each once, with positions that put them back in reading order, and their
skip counts add up to the whole read's, for every format and every kind of bad pair."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import encode, make_image
from sanitize.io.pairs import Skips, open_pairs
from sanitize.stages.embed import lanes_for


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _image(i: int) -> bytes:
    return encode(make_image(i, 16))


def _webdataset(root) -> str:
    members = []
    for i in range(11):
        key = f"k{i:02d}"
        image = b"not an image" if i == 3 else _image(i)
        caption = b"   " if i == 5 else f"caption {i}".encode()
        members += [(f"{key}.png", image), (f"{key}.txt", caption)]
    members += [("../evil.png", _image(1)), ("../evil.txt", b"escape"), ("k99.txt", b"no image")]
    members += [("k00.json", b"{}")]  # after its pair: ignored, counted
    _tar(root / "00000.tar", members)
    data = (root / "00000.tar").read_bytes()
    (root / "00000.tar").write_bytes(data[: len(data) - 1536])  # cut off the end-of-archive blocks
    return str(root)


def _parquet(root) -> str:
    n = 12
    pq.write_table(pa.table({
        "key": [f"{i:06d}" for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
        "status": ["failed_to_download" if i == 2 else "success" for i in range(n)],
        "jpg": [None if i in (2, 7) else b"garbage" if i == 9 else _image(i) for i in range(n)],
    }), root / "00000.parquet")
    return str(root)


def _csv(root) -> str:
    rows = ["filepath\ttitle"]
    for i in range(10):
        (root / f"{i}.png").write_bytes(b"garbage" if i == 4 else _image(i))
        rows.append(f"{'missing.png' if i == 6 else f'{i}.png'}\t{'' if i == 8 else f'caption {i}'}")
    rows.insert(3, "")  # a blank line is not a row
    (root / "list.tsv").write_text("\n".join(rows) + "\n")
    return str(root / "list.tsv")


def _folder(root) -> str:
    for i in range(9):
        (root / f"{i}.png").write_bytes(b"garbage" if i == 1 else _image(i))
        if i != 6:
            (root / f"{i}.txt").write_text(f"caption {i}")
    return str(root)


@pytest.mark.parametrize("make", [_webdataset, _parquet, _csv, _folder])
@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_add_up_to_a_whole_read(tmp_path, make, lanes):
    path = make(tmp_path)
    whole = open_pairs(path)
    (shard,) = whole.shards
    skips = Skips()
    expected = list(shard.pairs(skips))
    assert len(expected) >= 5 and skips.total >= 2  # the fixture has good and bad pairs

    got, lane_skips = [], Counter()
    for lane in range(lanes):
        mine = Skips()
        pairs = list(shard.in_lane(lane, lanes).pairs(mine))
        assert all(p.position % lanes == lane for p in pairs)
        assert [p.position for p in pairs] == sorted(p.position for p in pairs)
        got += pairs
        lane_skips += mine.counts
    got.sort(key=lambda p: p.position)
    assert [(p.key, p.caption, p.image_bytes) for p in got] == [(p.key, p.caption, p.image_bytes) for p in expected]
    assert [p.position for p in got] == [p.position for p in expected]
    assert +lane_skips == +skips.counts


def test_lanes_for_gives_every_worker_a_part():
    assert lanes_for(1, 4) == 4 and lanes_for(2, 4) == 2 and lanes_for(3, 4) == 1
    assert lanes_for(6, 2) == 1 and lanes_for(1, 0) == 1 and lanes_for(0, 2) == 1


def test_a_lane_out_of_range_is_refused(tmp_path):
    (shard,) = open_pairs(_folder(tmp_path)).shards
    with pytest.raises(ValueError):
        shard.in_lane(2, 2)
