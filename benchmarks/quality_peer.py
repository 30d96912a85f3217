"""The peer of ``bench_quality.py --peer``: a DINO training loop built from lightly's public blocks.

What a user would write instead of tinydino, following lightly's DINO example: ``DINOTransform`` multi-crop views from
a torchvision ``ImageFolder``, a timm ViT backbone with ``DINOProjectionHead``, ``DINOLoss``, AdamW and
``update_momentum`` for the teacher, every view through the networks on its own. It gets the run's budget and recipe
from ``main_dino``'s parsed flags: the same backbone and random init (built right after ``torch.manual_seed(--seed)``),
crops, batch, iterations, head, temperatures, and the same per-iteration learning-rate, weight-decay and momentum
schedules; gradients are clipped per parameter (official DINO) and the head's last layer is frozen for
``--freeze_last_layer`` epochs. Requires ``pip install -r benchmarks/requirements-bench.txt``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.transforms import DINOTransform
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from utils.model.vit import build_backbone
from utils.train.schedules import cosine_scheduler, teacher_momentum_schedule


class PeerDINO(nn.Module):
    """Student and teacher backbone + lightly's projection head; the teacher starts as the student's copy."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        torch.manual_seed(args.seed)
        self.student_backbone = build_backbone(args.arch, args.patch_size, args.global_crop_size, args.drop_path_rate)
        dim = self.student_backbone.embed_dim
        self.student_head = DINOProjectionHead(
            dim,
            2048,
            256,
            args.out_dim,
            batch_norm=args.use_bn_in_head,
            freeze_last_layer=args.freeze_last_layer,
            norm_last_layer=args.norm_last_layer,
        )
        self.teacher_backbone = build_backbone(args.arch, args.patch_size, args.global_crop_size, 0.0)
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head = DINOProjectionHead(dim, 2048, 256, args.out_dim, batch_norm=args.use_bn_in_head)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x))

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x))


def param_groups(model: nn.Module) -> list[dict]:
    """Official DINO's split: weight decay on weight matrices, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_parameter(params: list[nn.Parameter], clip: float) -> None:
    """Official DINO's ``clip_gradients``: each gradient scaled by ``min(1, clip / (||g|| + 1e-6))``."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])


def train_peer(args: argparse.Namespace, data_root: Path, iters: int, out_dir: Path, device: torch.device) -> dict:
    """Train ``iters`` iterations on ``data_root/train``; returns the teacher's ``checkpoint`` path (``{"teacher":
    {"backbone.<key>": tensor}}``), ``train_seconds`` (the loop), ``seconds`` (set-up included) and ``images_per_s``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = DINOTransform(
        global_crop_size=args.global_crop_size,
        global_crop_scale=tuple(args.global_crops_scale),
        local_crop_size=args.local_crop_size,
        local_crop_scale=tuple(args.local_crops_scale),
        n_local_views=args.local_crops_number,
        sigmas=tuple(args.blur_sigma),
    )
    dataset = ImageFolder(str(Path(data_root) / "train"), transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size_per_gpu,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    niter, epochs = len(loader), math.ceil(iters / len(loader))
    model = PeerDINO(args).to(device)
    criterion = DINOLoss(
        output_dim=args.out_dim,
        warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
    ).to(device)
    student = [*model.student_backbone.parameters(), *model.student_head.parameters()]
    student_modules = nn.ModuleList([model.student_backbone, model.student_head])
    optimizer = torch.optim.AdamW(param_groups(student_modules))
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    lr = cosine_scheduler(args.lr * args.batch_size_per_gpu / 256.0, args.min_lr, epochs, niter, args.warmup_epochs)
    wd = cosine_scheduler(args.weight_decay, wd_end, epochs, niter)
    momentum = teacher_momentum_schedule(args.momentum_teacher, epochs, niter)

    step, train_seconds = 0, 0.0
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        for views, _ in loader:
            if step >= iters:
                break
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[step]
                if i == 0:
                    group["weight_decay"] = wd[step]
            views = [view.to(device) for view in views]
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model(view) for view in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_per_parameter(student, args.clip_grad)
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            update_momentum(model.student_backbone, model.teacher_backbone, m=float(momentum[step]))
            update_momentum(model.student_head, model.teacher_head, m=float(momentum[step]))
            step += 1
        train_seconds += time.perf_counter() - epoch_start
        print(f"peer: epoch {epoch} done, {step} iterations, loss {loss.item():.3f}", flush=True)
    checkpoint = out_dir / "checkpoint.pth"
    teacher = {f"backbone.{k}": v.cpu() for k, v in model.teacher_backbone.state_dict().items()}
    torch.save({"teacher": teacher}, checkpoint)
    return {
        "checkpoint": checkpoint,
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "images_per_s": step * args.batch_size_per_gpu / train_seconds if train_seconds else None,
    }
