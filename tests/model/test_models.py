import pytest
import timm
import torch
import torch.nn.functional as F

from utils.model.vit import DINOHead, ModelError, MultiCropWrapper, build_backbone, group_by_resolution
from utils.train.optim import build_optimizer, get_params_groups


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16, img_size=64).eval()


def test_forward_is_timms_own(backbone):
    """Our backbone is timm's model: same keys, and the same forward as a plain timm instance with its weights."""
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, dynamic_img_size=True).eval()
    plain.load_state_dict(backbone.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), plain(x))


def test_intermediate_layers_shapes_and_cls(backbone):
    x = torch.randn(2, 3, 64, 48)  # non-square: 4 x 3 patches
    with torch.no_grad():
        layers = backbone.get_intermediate_layers(x, n=3)
        assert len(layers) == 3
        assert all(t.shape == (2, 1 + 12, 192) for t in layers)
        assert torch.allclose(layers[-1][:, 0], backbone(x), atol=1e-5)


def test_last_selfattention_equals_manual_computation(backbone):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        attn = backbone.get_last_selfattention(x)
        assert attn.shape == (2, 3, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 17))
        # Manual: tokens entering the last block, then its norm1 and qkv weights, head by head.
        tokens = backbone.prepare_tokens(x)
        for block in backbone.blocks[:-1]:
            tokens = block(tokens)
        last = backbone.blocks[-1]
        h = F.layer_norm(tokens, (192,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
        qkv = h @ last.attn.qkv.weight.T + last.attn.qkv.bias
        q, k = qkv[..., :192], qkv[..., 192:384]
        for head in range(3):
            qh, kh = q[..., head * 64 : (head + 1) * 64], k[..., head * 64 : (head + 1) * 64]
            expected = torch.softmax(qh @ kh.transpose(1, 2) / 8.0, dim=-1)
            torch.testing.assert_close(attn[:, head], expected, atol=1e-5, rtol=1e-5)


def test_patch_size_and_any_timm_name():
    assert build_backbone("vit_tiny", patch_size=8, img_size=32).patch_embed.patch_size == (8, 8)
    model = build_backbone("vit_small_patch16_224", img_size=32)
    assert model.embed_dim == 384 and hasattr(model, "get_last_selfattention")


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown --arch"):
        build_backbone("vit_gigantic_nonsense")
    with pytest.raises(ModelError, match="not a timm VisionTransformer"):
        build_backbone("resnet18")


def test_dino_head_shapes_and_bottleneck_normalised():
    head = DINOHead(192, 1000, nlayers=3, hidden_dim=64, bottleneck_dim=32)
    out = head(torch.randn(5, 192))
    assert out.shape == (5, 1000)
    assert (
        isinstance(head.mlp, torch.nn.Sequential) and len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    )
    z = F.normalize(head.mlp(torch.randn(4, 192)), dim=-1)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))
    assert DINOHead(192, 10, use_bn=True).mlp[1].__class__ is torch.nn.BatchNorm1d


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_norm_frozen_at_one(norm_last_layer):
    torch.manual_seed(0)
    head = DINOHead(16, 50, norm_last_layer=norm_last_layer, hidden_dim=32, bottleneck_dim=8)
    optimizer = build_optimizer("adamw", get_params_groups(head))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    head(torch.randn(8, 16)).pow(2).sum().backward()
    optimizer.step()
    row_norms = head.last_layer.weight.norm(dim=1)
    if norm_last_layer:
        torch.testing.assert_close(row_norms, torch.ones(50))
    else:
        assert not torch.allclose(row_norms, torch.ones(50))


def test_multicrop_wrapper_groups_resolutions_and_keeps_order():
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=64).eval()
    head = DINOHead(192, 20, hidden_dim=32, bottleneck_dim=8)
    wrapper = MultiCropWrapper(backbone, head).eval()
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    assert [len(g) for g in group_by_resolution(crops)] == [2, 1]
    calls = []
    backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        out = wrapper(crops)
        assert out.shape == (6, 20)
        assert calls == [4, 2]
        for i, crop in enumerate(crops):
            torch.testing.assert_close(out[2 * i : 2 * i + 2], head(backbone(crop)), atol=1e-5, rtol=1e-5)
