"""Models from open_clip: shipped configs, open_clip names, config JSON paths, local weights."""

from __future__ import annotations

import json

import pytest
import torch

from sanitize.models.factory import DEFAULT_MODEL, create_model, encode_pairs, resolve_config, shipped_models


def test_shipped_tiny_model_encodes_normalised_pairs():
    torch.manual_seed(0)
    model, tokenizer, image_size, config = create_model(DEFAULT_MODEL)
    assert DEFAULT_MODEL in shipped_models() and "safeclip-small-vit" in shipped_models()
    assert image_size == 28 and config["name"] == DEFAULT_MODEL
    tokens = tokenizer(["a photo of a shirt", "an ankle boot"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        image_emb, text_emb = encode_pairs(model, images, tokens)
    assert image_emb.shape == text_emb.shape == (2, config["embed_dim"])
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_open_clip_names_and_json_paths_resolve(tmp_path):
    name, config = resolve_config("RN50")
    assert name == "RN50" and config["vision_cfg"]["layers"] == [3, 4, 6, 3]
    custom = {"embed_dim": 32,
              "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(custom))
    model, tokenizer, image_size, config = create_model(str(path))
    assert config["name"] == "my-tiny" and image_size == 16
    assert tokenizer(["x"]).shape == (1, 16)
    assert model.text_projection.shape == (32, 32)


def test_unknown_names_and_bad_configs_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable model config"):
        create_model(str(bad))
    with pytest.raises(ValueError, match="not found"):
        create_model(str(tmp_path / "missing.json"))


def test_pretrained_local_open_clip_weights_load_and_mismatch_is_reported(tmp_path):
    torch.manual_seed(1)
    source, *_ = create_model(DEFAULT_MODEL)
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, weights)
    torch.manual_seed(2)
    loaded, *_ = create_model(DEFAULT_MODEL, pretrained=str(weights))
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="cannot load"):
        create_model("safeclip-small-vit", pretrained=str(weights))
    with pytest.raises(ValueError, match="never downloaded"):
        create_model(DEFAULT_MODEL, pretrained="laion2b_s34b_b79k")


def test_open_clip_main_registers_shipped_and_json_configs(tmp_path):
    import json

    import open_clip

    from sanitize.models.factory import CONFIG_DIR
    from sanitize.models.open_clip_main import register_configs

    config = json.loads((CONFIG_DIR / "safeclip-tiny-vit.json").read_text())
    config["embed_dim"] = 64
    (tmp_path / "my-clip.json").write_text(json.dumps(config))
    argv = register_configs(["--train-data", "x.tar", "--model", str(tmp_path / "my-clip.json"), "--epochs", "1"])
    assert argv == ["--train-data", "x.tar", "--model", "my-clip", "--epochs", "1"]
    assert open_clip.get_model_config("my-clip")["embed_dim"] == 64
    assert open_clip.get_model_config("safeclip-small-vit") is not None
    assert register_configs([f"--model={tmp_path / 'my-clip.json'}"]) == ["--model=my-clip"]
    with pytest.raises(SystemExit, match="not found"):
        register_configs(["--model", str(tmp_path / "nope.json")])
