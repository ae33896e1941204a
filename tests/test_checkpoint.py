"""Checkpoints: round trip, atomic writes, RNG states, clear errors for bad files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sanitize.models.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint, rng_state, save_checkpoint,
                                 set_rng_state)
from sanitize.models.factory import create_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("safeclip-tiny-vit")


def test_round_trip_keeps_weights_config_tokenizer_and_training_state(tiny, tmp_path):
    model, _tok, _size, config = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 28, 28), torch.randint(1, 100, (2, 32)))[0].sum().backward()
    optimizer.step()
    state = {"epoch": 3, "step": 17, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "safe_ratio": {"ratio": 0.31}}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, config, training_state=state)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    loaded, tokenizer, image_size, loaded_config, loaded_state = load_checkpoint(path)
    assert image_size == 28 and loaded_config == config
    assert tokenizer(["a coat"]).shape == (1, 32)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_state["epoch"] == 3 and loaded_state["safe_ratio"] == {"ratio": 0.31}
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded_state["optimizer"])
    original = optimizer.state_dict()["state"]
    assert original and fresh.state_dict()["state"].keys() == original.keys()
    some = next(iter(original))
    assert torch.equal(fresh.state_dict()["state"][some]["exp_avg"], original[some]["exp_avg"])
    assert read_checkpoint(path)["safeclip_version"]


def test_rng_states_restore_python_numpy_and_torch():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_corrupt_truncated_foreign_and_pickled_code_files_are_clear_errors(tiny, tmp_path):
    model, _tok, _size, config = tiny
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, config, training_state={})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)  # plain open_clip weights, not ours
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "safeclip-checkpoint", "payload": Exploit()}, pickled)
    for path, message in [(truncated, "not a readable checkpoint"), (garbage, "not a readable checkpoint"),
                          (foreign, "not a safeclip checkpoint"), (pickled, "pickled code"),
                          (tmp_path / "missing.pt", "not found")]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert isinstance(info.value, ValueError)  # the CLI turns ValueErrors into one-line messages
        assert "\n" not in str(info.value)
    assert not Exploit.ran


def test_architecture_mismatch_is_reported(tiny, tmp_path):
    model, _tok, _size, config = tiny
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, config, training_state={})
    _m, _t, _s, small_config = create_model("safeclip-small-vit")
    with pytest.raises(CheckpointError, match="safeclip-tiny-vit model, not safeclip-small-vit"):
        load_checkpoint(path, expect_config=small_config)
    load_checkpoint(path, expect_config=dict(config, name="renamed"))  # the name alone does not matter
    # weights that do not fit the stored config (e.g. a hand-edited file)
    payload = read_checkpoint(path)
    payload["model_config"] = small_config
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(bad)


def test_save_replaces_atomically(tiny, tmp_path):
    model, _tok, _size, config = tiny
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, config, training_state={"epoch": 1})
    save_checkpoint(path, model, config, training_state={"epoch": 2})
    assert load_checkpoint(path)[4]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


class Exploit:
    """An object whose unpickling would run code; weights_only loading must refuse it."""

    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True
        return None
