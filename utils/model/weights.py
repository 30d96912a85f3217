"""Loading backbone weights from untrusted files: our checkpoints, the official DINO releases, timm's hub names.

Official DINO ViT state dicts use the same parameter names as timm's ``VisionTransformer`` (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``),
so they load directly once the ``module.`` / ``backbone.`` prefixes of full training checkpoints are stripped and
the position embeddings are resampled to the model's grid.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from utils.model.vit import build_backbone
from utils.runtime.checkpoint import load_checkpoint
from utils.runtime.errors import CheckpointError, ModelError

#: Prefixes that wrappers add in front of backbone keys (DDP, the multi-crop wrapper), stripped in this order.
PREFIXES = ("module.", "backbone.")
#: Keys that belong to the DINO projection head, not to the backbone.
HEAD_PREFIXES = ("head.", "mlp.", "last_layer.")


def select_state_dict(checkpoint: Mapping, checkpoint_key: str | None, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: ``checkpoint[checkpoint_key]`` for full checkpoints, the file itself
    when it is already a state dict (the official backbone-only releases)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} does not hold a state dict (it holds a {type(checkpoint).__name__})")
    if checkpoint_key and checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], Mapping):
        return dict(checkpoint[checkpoint_key])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    nested = sorted(k for k, v in checkpoint.items() if isinstance(v, Mapping))
    raise CheckpointError(
        f"{source} has no {checkpoint_key!r} entry: use --checkpoint_key with one of {', '.join(nested) or '(none)'}"
    )


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``backbone.``) and drop the DINO head's keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if not key.startswith(HEAD_PREFIXES):
            cleaned[key] = value
    return cleaned


def adapt_position_embedding(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample ``pos_embed`` (bicubic) when the file's patch grid differs from the model's (e.g. 224 → 128 px)."""
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape or pos.ndim != 3:
        return state_dict
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix, verbose=False
    )
    return state_dict


def load_backbone_weights(
    model: nn.Module, path: str, checkpoint_key: str | None = "teacher", trust: bool = False
) -> int:
    """Load a backbone's weights from ``path`` into ``model``; refuse anything that would leave it partly random.

    Returns the number of tensors loaded. A file whose keys or shapes do not fit the architecture raises
    :class:`ModelError` naming the mismatch; an unsafe or corrupt file raises :class:`CheckpointError`.
    """
    checkpoint = load_checkpoint(path, trust=trust)
    state_dict = backbone_state_dict(select_state_dict(checkpoint, checkpoint_key, path))
    state_dict = adapt_position_embedding(state_dict, model)
    expected = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if wrong_shape or missing or unexpected:
        details = []
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {'; '.join(wrong_shape[:3])})")
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        raise ModelError(
            f"the weights in {path} do not fit this architecture: {'; '.join(details)}. "
            "Check --arch and --patch_size (and --checkpoint_key)"
        )
    model.load_state_dict(state_dict, strict=True)
    return len(state_dict)


def build_pretrained_backbone(
    arch: str,
    patch_size: int,
    img_size: int,
    pretrained_weights: str | None = None,
    checkpoint_key: str | None = "teacher",
    timm_model: str | None = None,
    trust: bool = False,
) -> nn.Module:
    """The backbone the evaluation scripts use: a timm hub model (``timm_model``), or ``arch`` with weights from
    ``pretrained_weights`` (our checkpoints or the official DINO files), or a random-init ``arch`` if neither."""
    if timm_model:
        try:
            return build_backbone(timm_model, patch_size, img_size, pretrained=True)
        except ModelError:
            raise
        except Exception as exc:  # network errors come in many types (URLError, HF hub errors, OSError)
            raise ModelError(
                f"could not fetch timm's pretrained {timm_model!r} ({type(exc).__name__}): this needs internet access "
                "to the Hugging Face hub; offline, download the weights elsewhere and pass --pretrained_weights FILE"
            ) from exc
    model = build_backbone(arch, patch_size, img_size)
    if pretrained_weights:
        load_backbone_weights(model, pretrained_weights, checkpoint_key, trust=trust)
    return model
