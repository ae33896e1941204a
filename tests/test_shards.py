"""The shard writer: atomic shards, interrupted runs, determinism, key checks."""

from __future__ import annotations

import json
import os

import pytest

from helpers import make_pairs
from sanitize.io import shards
from sanitize.io.pairs import open_pairs
from sanitize.io.shards import ShardWriter, atomic_write_bytes, write_pairs


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))  # includes hidden temporary files, if any were left


def test_exception_mid_shard_leaves_only_complete_shards(tmp_path):
    pairs = make_pairs(5, size=8)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, samples_per_shard=2) as writer:
            for i, pair in enumerate(pairs):
                if i == 3:  # shard 00000 is done, 00001 holds one pending pair
                    raise RuntimeError("boom")
                writer.write(pair)
    assert _listing(tmp_path) == ["00000.parquet", "00000.tar", "00000_stats.json", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2}
    source = open_pairs(str(tmp_path))
    assert [p.key for p in source] == [p.key for p in pairs[:2]] and source.skips.total == 0


def test_exception_before_first_shard_writes_nothing(tmp_path):
    with pytest.raises(KeyError):
        with ShardWriter(tmp_path / "out", samples_per_shard=10) as writer:
            writer.write(make_pairs(1)[0])
            raise KeyError("stop")
    assert _listing(tmp_path / "out") == []


def test_tar_is_renamed_last(tmp_path, monkeypatch):
    """A crash between the sidecars and the tar leaves no .tar, so readers see no shard."""
    real = shards.atomic_write_bytes

    def crash_on_tar(path, data):
        if str(path).endswith(".tar"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", crash_on_tar)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(make_pairs(3, size=8), tmp_path, samples_per_shard=3)
    assert not [n for n in _listing(tmp_path) if n.endswith(".tar")]


def test_atomic_write_failure_leaves_no_temporary_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "a.bin", "not bytes")  # fails inside the write
    assert _listing(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old"


def test_same_pairs_give_byte_identical_shards(tmp_path):
    write_pairs(make_pairs(5, size=8, seed=2), tmp_path / "a", samples_per_shard=2)
    write_pairs(make_pairs(5, size=8, seed=2), tmp_path / "b", samples_per_shard=2)
    names = _listing(tmp_path / "a")
    assert names == _listing(tmp_path / "b")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_appending_run_keeps_sizes_of_existing_shards(tmp_path):
    write_pairs(make_pairs(3, size=8), tmp_path, samples_per_shard=2)
    (tmp_path / "00001.tar").unlink()  # a shard removed by hand: its stale entry goes
    with ShardWriter(tmp_path, samples_per_shard=2, start_shard=5) as writer:
        writer.write_all(make_pairs(2, size=8, seed=9))
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2, "00005.tar": 2}


@pytest.mark.parametrize("key", ["a.b", "dir/x.y", "", " padded "])
def test_keys_webdataset_cannot_store_are_refused(tmp_path, key):
    pair = make_pairs(1, size=8)[0]
    pair.key = key
    with pytest.raises(ValueError, match="cannot be stored"):
        write_pairs([pair], tmp_path)
    assert not [n for n in _listing(tmp_path) if n.endswith(".tar")]


def test_duplicate_keys_in_a_shard_are_refused(tmp_path):
    pairs = make_pairs(2, size=8)
    pairs[1].key = pairs[0].key
    with pytest.raises(ValueError, match="duplicate key"):
        write_pairs(pairs, tmp_path)


def test_key_with_folder_round_trips(tmp_path):
    pairs = make_pairs(2, size=8)
    pairs[0].key, pairs[1].key = "sub/a", "sub/b"
    write_pairs(pairs, tmp_path)
    assert [p.key for p in open_pairs(str(tmp_path))] == ["sub/a", "sub/b"]


KILLED_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from helpers import make_pairs
from sanitize.io.shards import ShardWriter

def pairs():
    yield from make_pairs(3, size=8)  # shard 00000 (2 pairs) done, 00001 pending
    open(sys.argv[1] + "/../ready", "w").close()
    time.sleep(60)
    yield from make_pairs(3, size=8, seed=1)

with ShardWriter(sys.argv[1], samples_per_shard=2) as writer:
    writer.write_all(pairs())
"""


def test_killed_writer_leaves_no_shard_that_looks_complete(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), os.path.dirname(__file__)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _listing(out) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    source = open_pairs(str(out))
    assert [p.key for p in source] == ["000000", "000001"] and source.skips.total == 0
