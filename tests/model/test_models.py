import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from utils.model.vit import DINOHead, MultiCropWrapper, build_backbone, group_by_resolution
from utils.runtime.errors import ModelError
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


class OfficialDINOHead(torch.nn.Module):
    """Official DINO's ``DINOHead`` (facebookresearch/dino, vision_transformer.py), written out: its ``_init_weights``
    runs before the last layer exists, so the last layer keeps ``nn.Linear``'s default init; ``weight_g`` is 1."""

    def __init__(
        self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256
    ):
        super().__init__()
        layers = [torch.nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(torch.nn.BatchNorm1d(hidden_dim))
        layers.append(torch.nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(torch.nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(torch.nn.BatchNorm1d(hidden_dim))
            layers.append(torch.nn.GELU())
        layers.append(torch.nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = torch.nn.Sequential(*layers)
        self.apply(self._init_weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                torch.nn.init.constant_(m.bias, 0)


@pytest.mark.parametrize("use_bn", [False, True])
def test_head_init_is_the_official_one(use_bn):
    """Same seed, same parameters as the official head: the MLP truncated-normal, the last layer's ``weight_v``
    PyTorch's default ``nn.Linear`` init (kaiming-uniform, bound ``1 / sqrt(in)``), ``weight_g`` ones."""
    torch.manual_seed(3)
    official = OfficialDINOHead(48, 300, use_bn=use_bn, hidden_dim=64, bottleneck_dim=32)
    torch.manual_seed(3)
    ours = DINOHead(48, 300, use_bn=use_bn, hidden_dim=64, bottleneck_dim=32)
    expected = official.state_dict()
    assert set(ours.state_dict()) == set(expected)
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert ours.last_layer.weight_g.requires_grad is False


def test_last_layer_weight_is_kaiming_uniform():
    """The last layer's ``weight_v`` is ``U(-1/sqrt(in), 1/sqrt(in))`` (kaiming_uniform with a = sqrt(5)): bounded by
    the bound, spread over it (row norms about ``sqrt(in / 3) / sqrt(in)``), not a 0.02 normal."""
    in_dim = 256
    torch.manual_seed(0)
    v = DINOHead(16, 4096, hidden_dim=32, bottleneck_dim=in_dim).last_layer.weight_v.detach()
    bound = 1 / math.sqrt(in_dim)
    assert v.abs().max() <= bound
    assert v.abs().max() > 0.99 * bound
    torch.testing.assert_close(v.std(), torch.tensor(bound / math.sqrt(3)), rtol=0.01, atol=0)
