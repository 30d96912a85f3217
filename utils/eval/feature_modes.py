"""Which frozen feature of a ViT to evaluate: the CLS token or the mean patch token, of the last n blocks.

``make_feature_fn(use_cls, n_last_blocks)`` returns a ``feature_fn(model, images) -> [B, D]`` for
:func:`utils.eval.features.extract_features`. It reads the outputs of the last ``n_last_blocks`` blocks (each through
the final norm) with the backbone's ``get_intermediate_layers`` and, per block, takes the CLS token (``use_cls=True``,
DINO's default) or the mean of the patch tokens (prefix tokens excluded); the per-block features are concatenated
oldest block first, so ``D = n_last_blocks * embed_dim``. With ``use_cls=True, n_last_blocks=1`` this is exactly the
backbone's ``forward`` output (:func:`utils.eval.features.cls_features`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenFeatures", "make_feature_fn", "describe_feature"]


class TokenFeatures:
    """``feature_fn(model, images [B, 3, H, W]) -> [B, n_last_blocks * C]`` (see the module docstring)."""

    def __init__(self, use_cls: bool = True, n_last_blocks: int = 1):
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
        self.use_cls = use_cls
        self.n_last_blocks = n_last_blocks

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        blocks = model.get_intermediate_layers(images, self.n_last_blocks)
        if self.use_cls:
            parts = [tokens[:, 0] for tokens in blocks]
        else:
            prefix = model.num_prefix_tokens
            parts = [tokens[:, prefix:].mean(dim=1) for tokens in blocks]
        return torch.cat(parts, dim=-1)

    def __repr__(self) -> str:
        return f"TokenFeatures(use_cls={self.use_cls}, n_last_blocks={self.n_last_blocks})"


def make_feature_fn(use_cls: bool = True, n_last_blocks: int = 1) -> TokenFeatures:
    """The feature function for ``--use_cls`` / ``--n_last_blocks`` (see :class:`TokenFeatures`)."""
    return TokenFeatures(use_cls, n_last_blocks)


def describe_feature(use_cls: bool, n_last_blocks: int) -> str:
    """Short human-readable name: ``CLS``, ``mean patch``, ``CLS x4 blocks``."""
    name = "CLS" if use_cls else "mean patch"
    return name if n_last_blocks == 1 else f"{name} x{n_last_blocks} blocks"
