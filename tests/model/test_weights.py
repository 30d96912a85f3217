import os

import pytest
import torch

from utils.model.vit import build_backbone
from utils.model.weights import build_pretrained_backbone, load_backbone_weights
from utils.runtime.errors import CheckpointError, ModelError


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(3)
    return build_backbone("vit_tiny", patch_size=16, img_size=64).eval()


def features(model, size=64):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size))


def test_official_backbone_only_layout_loads_and_gives_identical_features(source, tmp_path):
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(source.state_dict(), path)  # official releases: the bare ViT state dict
    model = build_backbone("vit_tiny", patch_size=16, img_size=64)
    assert load_backbone_weights(model, str(path), checkpoint_key="teacher") == len(source.state_dict())
    assert torch.equal(features(model), features(source))


@pytest.mark.parametrize("prefix", ["module.backbone.", "backbone.", "module."])
def test_full_checkpoint_with_prefixes_and_head(source, tmp_path, prefix):
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state[prefix.replace("backbone.", "") + "head.mlp.0.weight"] = torch.zeros(4, 192)  # a DINO head key: dropped
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "student": {}, "epoch": 3}, path)
    model = build_backbone("vit_tiny", patch_size=16, img_size=64)
    load_backbone_weights(model, str(path), checkpoint_key="teacher")
    assert torch.equal(features(model), features(source))


def test_position_embedding_resampled_to_other_resolution(source, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("vit_tiny", patch_size=16, img_size=96)
    load_backbone_weights(model, str(path))
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_wrong_architecture_is_refused_with_the_mismatch(source, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ModelError, match="do not fit this architecture.*shape mismatches.*--arch"):
        load_backbone_weights(build_backbone("vit_small", patch_size=16, img_size=64), str(path))
    truncated = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    torch.save(truncated, path)
    with pytest.raises(ModelError, match="missing keys.*blocks.11"):
        load_backbone_weights(build_backbone("vit_tiny", patch_size=16, img_size=64), str(path))


def test_missing_checkpoint_key_lists_available_keys(source, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"student": source.state_dict(), "optimizer": {"x": {}}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no 'teacher' entry.*optimizer, student"):
        load_backbone_weights(build_backbone("vit_tiny", img_size=64), str(path), checkpoint_key="teacher")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"teacher": Payload()}, path)
    with pytest.raises(CheckpointError, match="--trust_checkpoint"):
        load_backbone_weights(build_backbone("vit_tiny", img_size=64), str(path))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_random_init_when_no_weights():
    model = build_pretrained_backbone("vit_tiny", 16, 64)
    assert model.embed_dim == 192


def test_timm_hub_offline_is_a_clear_error(monkeypatch):
    """Offline for real: huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, so the test sets the constant the
    hub reads at call time (and the environment, for any process started). The session's network guard fails the
    test if a connection is tried anyway."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="--pretrained_weights"):
        build_pretrained_backbone("vit_tiny", 16, 64, timm_model="vit_small_patch16_224.dino")
