"""The DINO pretraining run: set-up from the flags, resume, the epoch loop, checkpoints, evaluations and logs.

``main_dino.py`` parses the flags and calls :func:`train_dino`; everything a run does is here, in small methods.
The data loaders it trains on are built by :mod:`utils.data.loaders`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.data.augment.config import MultiCropConfig
from utils.data.augment.per_image import DataAugmentationDINO
from utils.data.folders import build_image_dataset
from utils.data.loaders import (
    attention_images,
    build_cached_loader,
    build_train_loader,
    check_batch_fits,
    knn_datasets,
    open_cache,
    resolve_image_cache,
)
from utils.data.setup import prepare_data_path
from utils.eval.attention import attention_grid_for_tensorboard
from utils.eval.knn_online import evaluate_knn
from utils.model.vit import build_dino_models, count_parameters
from utils.runtime.checkpoint import load_latest_checkpoint, restore_state, save_checkpoint
from utils.runtime.distributed import (
    DistributedContext,
    all_gather_objects,
    cleanup,
    init_distributed_mode,
)
from utils.runtime.host_memory import retain_freed_memory
from utils.runtime.monitoring import TensorBoard, append_json_line, flags_as_markdown, format_duration, log
from utils.runtime.rng import capture_rng_state, restore_rng_state, set_deterministic
from utils.runtime.signals import StopRequest
from utils.train.loss import DINOLoss
from utils.train.optim import build_grad_scaler, build_optimizer, get_params_groups, resolve_precision
from utils.train.schedules import cosine_scheduler, teacher_momentum_schedule
from utils.train.step import CollapseMonitor, DINOState, EpochPlan, train_one_epoch


def synchronise_batch_norms(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``model`` with its BatchNorm layers (``--use_bn_in_head``) turned into SyncBatchNorm when several CUDA processes
    train, as official DINO does for the student and the teacher: batch statistics over the global batch, each model
    keeping its own running statistics. Unchanged otherwise (SyncBatchNorm needs CUDA tensors: on CPUs each process
    normalises over its own batch)."""
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if ctx.world_size > 1 and ctx.device.type == "cuda" and has_batch_norm:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class DINOPretraining:
    """One pretraining run. ``run()`` trains from wherever ``output_dir`` left off and returns the last record."""

    def __init__(self, args: argparse.Namespace, ctx: DistributedContext):
        self.args, self.ctx = args, ctx
        self.output_dir = Path(args.output_dir)
        # The checkpoint to resume from is read (and an unsafe one refused) before any data is prepared or cached.
        self.resume_from = load_latest_checkpoint(self.output_dir, warn=log)
        self.data_path = prepare_data_path(args.dataset, args.data_path, args.download, is_main=ctx.is_main)
        crops = MultiCropConfig.from_args(args)
        augmentation = DataAugmentationDINO(crops)
        self.dataset = build_image_dataset(self.data_path, "train", transform=augmentation)
        check_batch_fits(len(self.dataset), args.batch_size_per_gpu, ctx.world_size)
        self.cache_dir = resolve_image_cache(args, self.dataset, self.data_path, ctx)
        if self.cache_dir is not None and args.batched_aug != "off":
            self.loader = build_cached_loader(args, self.dataset, self.cache_dir, ctx, crops)
            pipeline = f"decoded-image cache + batched augmentation on {ctx.device}"
        else:
            if self.cache_dir is not None:  # the per-image pipeline on cached pixels: no JPEG decoding
                self.dataset = open_cache(self.dataset, self.cache_dir, "train", augmentation)
            self.loader = build_train_loader(args, self.dataset, ctx)
            pipeline = "per-image augmentation in data workers" + (" from the cache" if self.cache_dir else "")
        self.niter = len(self.loader)
        log(
            f"data: {len(self.dataset)} training images from {self.data_path} ({pipeline}), {self.niter} iterations "
            f"per epoch on {ctx.world_size} process(es), device {ctx.device}"
        )
        self._build_models()
        self._build_schedules()
        self.run_state = {"epoch": 0, "iter_in_epoch": 0, "global_iter": 0, "knn_random_init": None}
        self.tb = TensorBoard(self.output_dir)
        self.knn_data = knn_datasets(args, self.data_path, self.cache_dir)
        self.collapse = CollapseMonitor(args.out_dim)
        self.attention_images = attention_images(args, self.data_path) if ctx.is_main else None

    def _build_models(self) -> None:
        args, ctx = self.args, self.ctx
        student, teacher = (synchronise_batch_norms(m, ctx) for m in build_dino_models(args))
        self.student_module, self.teacher = student.to(ctx.device), teacher.to(ctx.device)
        self.student = self.student_module
        if ctx.world_size > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.student = DistributedDataParallel(self.student_module, device_ids=ids)
        n_backbone = count_parameters(self.student_module.backbone) / 1e6
        n_head = count_parameters(self.student_module.head) / 1e6
        log(f"model: {args.arch} (patch {args.patch_size}), {n_backbone:.2f} M backbone + {n_head:.2f} M head params")
        precision = resolve_precision(args.precision, ctx.device)
        self.dino_loss = DINOLoss(
            args.out_dim,
            args.local_crops_number + 2,
            args.warmup_teacher_temp,
            args.teacher_temp,
            args.warmup_teacher_temp_epochs,
            args.epochs,
            centering=args.centering,
        ).to(ctx.device)
        self.optimizer = build_optimizer(args.optimizer, get_params_groups(self.student_module))
        self.scaler = build_grad_scaler(precision, ctx.device)
        student_forward, teacher_forward = self.student, self.teacher
        if args.compile:  # compiled forwards; parameters, state dicts and the EMA stay those of the plain modules
            student_forward, teacher_forward = torch.compile(self.student), torch.compile(self.teacher)
        self.state = DINOState(
            student=student_forward,
            teacher=teacher_forward,
            student_module=self.student_module,
            loss=self.dino_loss,
            optimizer=self.optimizer,
            scaler=self.scaler,
            device=ctx.device,
            precision=precision,
            clip_grad=args.clip_grad,
            clip_grad_mode=args.clip_grad_mode,
            freeze_last_layer=args.freeze_last_layer,
            koleo_weight=args.koleo_loss_weight,
        )

    def _build_schedules(self) -> None:
        args, niter = self.args, self.niter
        global_batch = args.batch_size_per_gpu * self.ctx.world_size
        wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
        self.schedules = {
            "lr": cosine_scheduler(args.lr * global_batch / 256.0, args.min_lr, args.epochs, niter, args.warmup_epochs),
            "wd": cosine_scheduler(args.weight_decay, wd_end, args.epochs, niter),
            "momentum": teacher_momentum_schedule(args.momentum_teacher, args.epochs, niter),
        }

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int, iter_in_epoch: int, global_iter: int) -> dict:
        """Everything the run depends on, with every process's RNG state (gathered: a collective call)."""
        rng_states = all_gather_objects(capture_rng_state())
        state = {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "epoch": epoch,
            "iter_in_epoch": iter_in_epoch,
            "global_iter": global_iter,
            "world_size": self.ctx.world_size,
            "rng": rng_states,
            "knn_random_init": self.run_state["knn_random_init"],
            "nonfinite_steps": self.state.nonfinite_steps,
            "scaler_backoffs": self.state.scaler_backoffs,
            "args": vars(self.args),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, epoch: int, iter_in_epoch: int, global_iter: int, keep_copy: bool = False) -> None:
        """Write ``checkpoint.pth`` (rank 0, atomically); an epoch-end save may also keep ``checkpointNNNN.pth``."""
        if iter_in_epoch >= self.niter:  # an epoch-end position is the next epoch's start
            epoch, iter_in_epoch = epoch + 1, 0
        state = self.checkpoint_state(epoch, iter_in_epoch, global_iter)
        if self.ctx.is_main:
            save_checkpoint(state, self.output_dir / "checkpoint.pth")
            if keep_copy:
                save_checkpoint(state, self.output_dir / f"checkpoint{epoch - 1:04d}.pth")

    def resume(self) -> bool:
        """Restore the newest good checkpoint of ``output_dir``, if any."""
        found, self.resume_from = self.resume_from, None
        if found is None:
            return False
        path, checkpoint = found
        scaler = self.scaler if "scaler" in checkpoint else None  # a run saved at another --precision has none
        if self.scaler is not None and scaler is None:
            log(f"note: {path} has no fp16 loss scale (another --precision): the GradScaler starts afresh")
        restore_state(
            checkpoint,
            self.run_state,
            student=self.student_module,
            teacher=self.teacher,
            optimizer=self.optimizer,
            scaler=scaler,
            dino_loss=self.dino_loss,
        )
        self.state.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self.state.scaler_backoffs = int(checkpoint.get("scaler_backoffs", 0))
        rng = checkpoint.get("rng")
        if rng and len(rng) == self.ctx.world_size:
            self._rng_to_restore = rng[self.ctx.rank]
        elif rng:
            log(
                f"note: {path} was written by {len(rng)} process(es), this run has {self.ctx.world_size}: "
                "training resumes, but not bit for bit"
            )
        log(
            f"resumed from {path} at epoch {self.run_state['epoch']}, iteration {self.run_state['iter_in_epoch']} "
            f"of the epoch ({self.run_state['global_iter']} in all)"
        )
        return True

    # ---- the run -------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The teacher backbone's online k-NN result (a collective call): the main process classifies, and every
        process gets its result, so that records and checkpoints agree across ranks."""
        a = self.args
        knn = evaluate_knn(self.teacher.backbone, *self.knn_data, self.ctx, a.batch_size_per_gpu, a.num_workers)
        return all_gather_objects(knn)[0]

    def run(self) -> dict:
        args = self.args
        self._rng_to_restore = None
        resumed = self.resume()
        self.tb.text("flags", flags_as_markdown(vars(args)))
        if self.knn_data and not resumed:
            self.run_state["knn_random_init"] = self.evaluate()
            knn = self.run_state["knn_random_init"]
            log(f"k-NN of the random-init backbone: top-1 {knn['top1']:.2f}%{_rank_note(knn)}")
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
        stop_request = StopRequest()
        record: dict = {}
        start_time = time.time()
        try:
            record = self._epochs(stop_request)
        finally:
            stop_request.restore()
            self.tb.close()
        log(f"training time {format_duration(time.time() - start_time)}")
        random_init = self.run_state["knn_random_init"]
        if record.get("knn_top1") is not None and random_init is not None:
            log(
                f"k-NN top-1 on the val split: trained {record['knn_top1']:.2f}%  vs random-init "
                f"{random_init['top1']:.2f}%"
            )
        return record

    def _epochs(self, stop_request: StopRequest) -> dict:
        args, rs = self.args, self.run_state
        record: dict = {}
        for epoch in range(rs["epoch"], args.epochs):
            if args.max_iters is not None and rs["global_iter"] >= args.max_iters:
                break
            start_iter = rs["iter_in_epoch"] if epoch == rs["epoch"] else 0
            self.loader.sampler.set_epoch(epoch, start=start_iter * args.batch_size_per_gpu)
            plan = EpochPlan(
                epoch=epoch,
                global_iter=rs["global_iter"],
                start_iter=start_iter,
                max_iters=args.max_iters,
                checkpoint_every=args.checkpoint_every,
                print_freq=args.print_freq,
                max_nonfinite=args.max_nonfinite,
                header=f"Epoch [{epoch}/{args.epochs}]",
            )
            result = train_one_epoch(
                self.state,
                self.loader,
                plan,
                self.schedules,
                self.tb,
                save=self.save,
                stop_request=stop_request,
                collapse=self.collapse,
            )
            rs["global_iter"] = result.global_iter
            record = {**{f"train_{k}": v for k, v in result.averages.items()}, "epoch": epoch}  # official keys
            if result.bad_images:
                log(f"epoch {epoch}: skipped {result.bad_images} unreadable image(s)")
            if result.stop_signal:
                if result.finished:  # the stop came on the epoch's last step: the epoch is complete, log it
                    self._end_of_epoch(epoch, record)
                record["stop_signal"] = stop_request.signal_name or "another process's signal"
                log(f"stop requested ({record['stop_signal']}): checkpoint saved at iteration {rs['global_iter']}")
                return record
            if not result.finished:  # --max_iters reached mid-epoch
                self.save(epoch, start_iter + (result.global_iter - plan.global_iter), result.global_iter)
                return record
            self._end_of_epoch(epoch, record)
        return record

    def _end_of_epoch(self, epoch: int, record: dict) -> None:
        args, rs = self.args, self.run_state
        last = epoch + 1 == args.epochs or (args.max_iters is not None and rs["global_iter"] >= args.max_iters)
        if self.knn_data and ((epoch + 1) % max(args.knn_every, 1) == 0 or last):
            knn = self.evaluate()
            record |= {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_feature_rank": knn["feature_rank"]}
            log(
                f"k-NN of the teacher after epoch {epoch}: top-1 {knn['top1']:.2f}%  top-5 {knn['top5']:.2f}%"
                f"{_rank_note(knn)}"
            )
        self.tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch, prefix="epoch/")
        if self.attention_images is not None and (epoch + 1) % args.attn_every == 0:
            grids = attention_grid_for_tensorboard(self.teacher.backbone, self.attention_images)
            for i, grid in enumerate(grids):
                self.tb.image(f"attention/image{i}", grid, epoch)
        keep = bool(args.saveckp_freq) and (epoch + 1) % args.saveckp_freq == 0
        self.save(epoch, self.niter, rs["global_iter"], keep_copy=keep)
        append_json_line(self.output_dir / "log.txt", record)
        self.tb.flush()


def _rank_note(knn: dict) -> str:
    """``"  (feature effective rank 12.3)"``, or nothing for a k-NN result without it (an older checkpoint's)."""
    rank = knn.get("feature_rank")
    return "" if rank is None else f"  (feature effective rank {rank:.1f})"


def train_dino(args: argparse.Namespace) -> dict:
    """The whole pretraining run; returns the final record (what ``log.txt``'s last line holds). A run stopped by a
    signal (after saving its checkpoint) returns a record with ``stop_signal`` set, so that a launcher can requeue."""
    ctx = init_distributed_mode(args.device, timeout_s=args.dist_timeout)
    set_deterministic(args.deterministic)
    torch.manual_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if ctx.device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True
    if ctx.device.type == "cpu" and retain_freed_memory():
        log("host memory: freed blocks kept for reuse (no page faults on each step's fresh tensors)")
    try:
        return DINOPretraining(args, ctx).run()
    finally:
        cleanup()
