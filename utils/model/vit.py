"""Models: timm Vision Transformers with DINO's backbone API, the DINO projection head, the multi-crop wrapper.

The backbone *is* timm's ``VisionTransformer`` (same parameters, same state-dict keys, same ``forward``); we only
give it DINO's two extra methods, ``get_intermediate_layers`` and ``get_last_selfattention``, by a mixin class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from utils.model.weight_norm import weight_norm_linear
from utils.runtime.errors import ModelError

#: Short names, as in the official DINO code, for timm's ViTs; ``{p}`` is filled with ``--patch_size``.
ARCH_ALIASES = {
    "vit_tiny": "vit_tiny_patch{p}_224",
    "vit_small": "vit_small_patch{p}_224",
    "vit_base": "vit_base_patch{p}_224",
    "vit_large": "vit_large_patch{p}_224",
}


class DINOBackboneMixin:
    """DINO's backbone API on top of a timm ``VisionTransformer``.

    Token tensors are ``[B, T, C]`` with ``T = num_prefix_tokens + N`` (CLS first, then any register tokens, then the
    ``N = (H / p) * (W / p)`` patch tokens, row-major).
    """

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` → embedded tokens ``[B, T, C]`` before the first block (timm's own steps)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The outputs of the last ``n`` blocks, each passed through the final norm: a list of ``n`` ``[B, T, C]``."""
        x = self.prepare_tokens(x)
        outputs = []
        first_kept = len(self.blocks) - n
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= first_kept:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, ``[B, heads, T, T]``, rows summing to 1.

        timm's fused attention returns no weights, so the last block's attention is recomputed exactly from its own
        ``norm1``, ``qkv``, ``q_norm``/``k_norm`` and ``scale``.
        """
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return attention_weights(self.blocks[-1].attn, self.blocks[-1].norm1(x))

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax attention ``[B, heads, T, T]`` that timm's ``Attention`` module ``attn`` computes for ``x``."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


_DINO_CLASSES: dict[type, type] = {}


def add_dino_api(model: nn.Module) -> nn.Module:
    """Give a timm ViT instance DINO's backbone methods in place (its class becomes a subclass of its own class)."""
    if isinstance(model, DINOBackboneMixin):
        return model
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{type(model).__name__} is not a timm VisionTransformer: DINO's backbone API needs one")
    cls = type(model)
    if cls not in _DINO_CLASSES:
        _DINO_CLASSES[cls] = type(f"DINO{cls.__name__}", (DINOBackboneMixin, cls), {})
    model.__class__ = _DINO_CLASSES[cls]
    return model


def check_arch(arch: str) -> None:
    """Raise :class:`ModelError` unless ``arch`` is a short name of :data:`ARCH_ALIASES` or a timm model name."""
    if arch not in ARCH_ALIASES and arch.split(".")[0] not in timm.list_models():
        vits = ", ".join(sorted(ARCH_ALIASES))
        raise ModelError(f"unknown --arch {arch!r}: use {vits}, or a timm ViT name such as vit_small_patch16_224")


def build_backbone(
    arch: str = "vit_tiny",
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
) -> nn.Module:
    """A timm ViT with no classifier (``forward`` returns the normalised CLS token ``[B, C]``), accepting any image
    size that is a multiple of the patch size (position embeddings are interpolated), with DINO's API added.

    ``arch`` is one of :data:`ARCH_ALIASES` or any timm ViT name; ``img_size`` is the training resolution
    (the global crop size), which sets the stored position-embedding grid.
    """
    kwargs = {"num_classes": 0, "img_size": img_size, "dynamic_img_size": True, "drop_path_rate": drop_path_rate}
    if arch in ARCH_ALIASES:  # timm registers patch 8/14/16/32 for some sizes only: build from the /16 config
        name = ARCH_ALIASES[arch].format(p=16)
        kwargs["patch_size"] = patch_size
    else:
        name = arch
        check_arch(arch)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # a timm model that is not a plain ViT rejects ViT keyword arguments
        raise ModelError(f"--arch {arch!r} is not a timm VisionTransformer ({exc})") from exc
    return add_dino_api(model)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation, ``W = g * V / ||V||`` row-wise.

    Parameters are named ``weight_g`` ``[out, 1]`` and ``weight_v`` ``[out, in]`` as in the official DINO head's
    state dict, and initialised as there: ``weight_v`` as PyTorch's default ``nn.Linear`` weight (kaiming-uniform,
    ``U(-1/sqrt(in), 1/sqrt(in))``, the same random draws), ``weight_g`` ones. With ``fix_norm=True`` the norms
    ``g`` stay 1 (they get no gradient). The forward and backward are
    :func:`utils.model.weight_norm.weight_norm_linear` (fused and blockwise on the CPU: no ``W`` is formed).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters' weight init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in]`` → ``[N, out]`` logits in the weights' dtype (float32 under autocast too: DINO divides them
        by a temperature of 0.04, where bf16's 8-bit mantissa would show)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return weight_norm_linear(x.to(self.weight_v.dtype), self.weight_v, self.weight_g)
        return weight_norm_linear(x, self.weight_v, self.weight_g)


class DINOHead(nn.Module):
    """DINO's projection head: MLP (``nlayers`` linear layers, GELU, optional BN) → L2-normalised bottleneck →
    weight-normalised linear layer to ``out_dim`` logits. ``[B, in_dim]`` → ``[B, out_dim]``.

    Initialised as official DINO's head: the MLP's linear layers truncated-normal (std 0.02, zero biases), the last
    layer (created after that init) as :class:`WeightNormLinear` says."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops of the same resolution are concatenated and go through the backbone in one call (so 2 global +
    n local crops cost two backbone calls); the head then runs once on every crop's features. Input: a list of
    ``V`` tensors ``[B, 3, H_v, W_v]``; output: ``[V * B, out_dim]``, crop-major (crop 0's batch first).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: torch.Tensor | Sequence[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs ``[V * B, out_dim]``; with ``return_features``, also the backbone's ``[V * B, C]``."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = torch.cat([self.backbone(torch.cat(group)) for group in group_by_resolution(crops)])
        output = self.head(features)
        return (output, features) if return_features else output


def group_by_resolution(crops: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a list of image batches into runs of consecutive batches with the same spatial size."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


def build_dino_models(args) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (backbone + DINO head) from the training flags; the teacher starts as the student's copy
    and takes no gradients. The student has stochastic depth (``--drop_path_rate``), the teacher none."""
    student_backbone = build_backbone(args.arch, args.patch_size, args.global_crop_size, args.drop_path_rate)
    teacher_backbone = build_backbone(args.arch, args.patch_size, args.global_crop_size, 0.0)
    embed_dim = student_backbone.embed_dim

    def head(norm_last_layer: bool) -> DINOHead:
        return DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=norm_last_layer)

    student = MultiCropWrapper(student_backbone, head(args.norm_last_layer))
    teacher = MultiCropWrapper(teacher_backbone, head(True))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
