"""The model's DINO semantics against independent references: the head's L2-normalised bottleneck (seen by hooking
the last layer), ``get_intermediate_layers`` against a forward written out block by block with timm's own modules,
and the teacher without stochastic depth."""

from __future__ import annotations

import argparse

import torch

from utils.model.vit import DINOHead, build_backbone, build_dino_models


def test_head_last_layer_gets_the_l2_normalised_bottleneck():
    """Official DINOHead.forward: ``x = mlp(x); x = F.normalize(x, dim=-1, p=2); x = last_layer(x)``. The last
    layer's input, caught by a hook, must be the MLP's output divided by its L2 norm, and the output that of a
    weight-normalised linear map ``g * V / ||V||`` of it."""
    torch.manual_seed(0)
    head = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=16)
    seen = []
    head.last_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(5, 24) * 3
    out = head(x)
    bottleneck = head.mlp(x).detach()
    expected_input = bottleneck / bottleneck.norm(dim=1, keepdim=True)
    torch.testing.assert_close(seen[0], expected_input)
    v, g = head.last_layer.weight_v.detach(), head.last_layer.weight_g.detach()
    torch.testing.assert_close(out.detach(), expected_input @ (g * v / v.norm(dim=1, keepdim=True)).T)
    assert bottleneck.norm(dim=1).sub(1).abs().min() > 0.1  # the normalisation is not a no-op here


def test_intermediate_layers_are_the_last_blocks_through_the_final_norm():
    """Official ``get_intermediate_layers(x, n)``: the last ``n`` blocks' outputs, each through ``self.norm``.
    Reference: timm's steps written out (patch embedding, position embedding, pre-norm, each block), and timm's
    own ``forward_features`` for the last block."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, 32).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(model.norm(tokens))
        layers = model.get_intermediate_layers(x, 3)
        assert len(layers) == 3
        for got, expected in zip(layers, outputs[-3:]):
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(model.get_intermediate_layers(x, 1)[0], model.forward_features(x))
        assert not torch.allclose(outputs[-1], tokens, atol=1e-3)  # the final norm changes the tokens


def test_teacher_has_no_stochastic_depth():
    """Official: the student gets ``drop_path_rate``, the teacher none. In training mode the teacher's forward is
    deterministic; the student's (drop path 0.5) is not, so the comparison can see drop path."""
    torch.manual_seed(0)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=16,
        global_crop_size=32,
        drop_path_rate=0.5,
        out_dim=16,
        use_bn_in_head=False,
        norm_last_layer=True,
    )
    student, teacher = build_dino_models(args)
    student.train(), teacher.train()
    x = [torch.randn(3, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher(x))
        assert not torch.equal(student(x), student(x))
