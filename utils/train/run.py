"""The DINO pretraining run: set-up from the flags, resume, the epoch loop, checkpoints, evaluations and logs.

``main_dino.py`` parses the flags and calls :func:`train_dino`; everything a run does is here, in small methods.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from utils.data.augment.batched import BatchedMultiCrop
from utils.data.augment.per_image import DataAugmentationDINO, eval_transform
from utils.data.device_loader import CachedMultiCropLoader
from utils.data.folders import build_image_dataset, has_labels
from utils.data.image_cache import CachedImages, cached_image_dataset, default_cache_dir
from utils.data.sampling import ResumableSampler, SeededSamples
from utils.data.setup import prepare_data_path
from utils.eval.attention import attention_grid_for_tensorboard
from utils.eval.knn_online import evaluate_knn
from utils.model.vit import build_dino_models, count_parameters
from utils.runtime.checkpoint import load_latest_checkpoint, restore_state, save_checkpoint
from utils.runtime.distributed import (
    DistributedContext,
    all_gather_objects,
    barrier,
    cleanup,
    init_distributed_mode,
    is_main_process,
)
from utils.runtime.errors import UsageError
from utils.runtime.host_memory import retain_freed_memory
from utils.runtime.monitoring import TensorBoard, append_json_line, flags_as_markdown, format_duration, log
from utils.runtime.rng import capture_rng_state, restore_rng_state, set_deterministic
from utils.runtime.signals import StopRequest
from utils.train.loss import DINOLoss
from utils.train.optim import build_grad_scaler, build_optimizer, get_params_groups, resolve_precision
from utils.train.schedules import cosine_scheduler, teacher_momentum_schedule
from utils.train.step import CollapseMonitor, DINOState, EpochPlan, train_one_epoch


def build_train_loader(args, dataset, ctx: DistributedContext) -> DataLoader:
    """Multi-crop batches ``(crops, labels, n_skipped)``: resumable, seeded per sample, skipping bad images."""
    sampler = ResumableSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    loader = DataLoader(
        SeededSamples(dataset, args.seed, ctx.rank),
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # the loader's own draws never touch the global RNG
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size_per_gpu} per process x "
            f"{ctx.world_size} processes: lower --batch_size_per_gpu"
        )
    return loader


def check_batch_fits(n_images: int, batch_size: int, world_size: int) -> None:
    """A user error (before anything is cached or written) when one process's share is smaller than one batch."""
    if -(-n_images // world_size) < batch_size:
        raise UsageError(
            f"the dataset has {n_images} images, fewer than one batch of {batch_size} per process x {world_size} "
            "processes: lower --batch_size_per_gpu"
        )


def knn_datasets(args, data_path, cache_dir=None):
    """(train, val) datasets with the evaluation transform for the online k-NN, or None (no labels, no val, off).
    With a cache folder, both read decoded pixels from it (the val split gets its own cache entry)."""
    if args.knn_every <= 0:
        return None
    transform = eval_transform(args.global_crop_size)
    train = build_image_dataset(data_path, "train", transform=transform)
    val = build_image_dataset(data_path, "val", transform=transform)
    if val is None or not has_labels(train) or not has_labels(val):
        log("online k-NN off: it needs labelled train/ and val/ splits")
        return None
    if cache_dir is not None:
        train, val = open_cache(train, cache_dir, "train", transform), open_cache(val, cache_dir, "val", transform)
    return train, val


#: Decoded size (bytes) up to which ``--cache_images auto`` caches: TinyImageNet's 100 000 images are 1.2 GB.
AUTO_CACHE_BYTES = 8 * 2**30


def image_area(dataset, tries: int = 20) -> int:
    """Pixels of the first readable image among the first ``tries`` (an unreadable file is skipped, not fatal)."""
    from PIL import Image

    for path, _ in dataset.samples[:tries]:
        try:
            with Image.open(path) as image:
                return image.size[0] * image.size[1]
        except (OSError, ValueError):
            continue
    return 0


def resolve_image_cache(args, dataset, data_path, ctx: DistributedContext) -> Path | None:
    """The cache folder to use (built by the main process, the others wait), or None when not caching.
    ``auto`` caches datasets whose decoded pixels (estimated from the first image) fit :data:`AUTO_CACHE_BYTES`."""
    if args.cache_images == "off":
        return None
    if args.cache_images == "auto" and len(dataset) * image_area(dataset) * 3 > AUTO_CACHE_BYTES:
        return None
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(data_path)
    if ctx.is_main:
        cache = open_cache(dataset, cache_dir, "train", None)
        skipped = f", {len(cache.skipped)} unreadable image(s) skipped" if cache.skipped else ""
        log(f"image cache: {len(cache)} decoded images in {cache.path}{skipped}")
    barrier()
    return cache_dir


def open_cache(dataset, cache_dir: Path, name: str, transform) -> CachedImages:
    """The cached pixels of ``dataset`` (built on first use; a changed file list rebuilds it)."""
    return cached_image_dataset(dataset, cache_dir, name=name, transform=transform, verbose=is_main_process())


def build_cached_loader(args, dataset, cache_dir: Path, ctx: DistributedContext) -> CachedMultiCropLoader:
    """The fast path: uint8 batches from the cache, augmented as whole batches on the training device."""
    cache = open_cache(dataset, cache_dir, "train", None)
    sampler = ResumableSampler(cache, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    augment = BatchedMultiCrop(
        args.global_crops_scale,
        args.local_crops_scale,
        args.local_crops_number,
        args.global_crop_size,
        args.local_crop_size,
    )
    on_device = (
        ctx.device.type == "cuda"
        and cache.images.nbytes < 0.25 * torch.cuda.get_device_properties(ctx.device).total_memory
    )
    loader = CachedMultiCropLoader(
        cache, sampler, args.batch_size_per_gpu, augment, ctx.device, args.seed, ctx.rank, images_on_device=on_device
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(cache)} images, fewer than one batch of {args.batch_size_per_gpu} per process x "
            f"{ctx.world_size} processes: lower --batch_size_per_gpu"
        )
    return loader


def attention_images(args, data_path, count: int = 4) -> torch.Tensor | None:
    """A fixed set of ``count`` images ``[count, 3, S, S]`` (val split if any, else train; evenly spaced over the
    split, so several classes show) whose attention maps go to TensorBoard every ``--attn_every`` epochs."""
    if args.attn_every <= 0:
        return None
    transform = eval_transform(args.global_crop_size)
    dataset = build_image_dataset(data_path, "val", transform=transform)
    dataset = dataset if dataset is not None else build_image_dataset(data_path, "train", transform=transform)
    step = max(len(dataset) // count, 1)
    return torch.stack([dataset[i * step][0] for i in range(min(count, len(dataset)))])


class DINOPretraining:
    """One pretraining run. ``run()`` trains from wherever ``output_dir`` left off and returns the last record."""

    def __init__(self, args: argparse.Namespace, ctx: DistributedContext):
        self.args, self.ctx = args, ctx
        self.output_dir = Path(args.output_dir)
        # The checkpoint to resume from is read (and an unsafe one refused) before any data is prepared or cached.
        self.resume_from = load_latest_checkpoint(self.output_dir, warn=log)
        self.data_path = prepare_data_path(args.dataset, args.data_path, args.download, is_main=ctx.is_main)
        augmentation = DataAugmentationDINO(
            args.global_crops_scale,
            args.local_crops_scale,
            args.local_crops_number,
            args.global_crop_size,
            args.local_crop_size,
        )
        self.dataset = build_image_dataset(self.data_path, "train", transform=augmentation)
        check_batch_fits(len(self.dataset), args.batch_size_per_gpu, ctx.world_size)
        self.cache_dir = resolve_image_cache(args, self.dataset, self.data_path, ctx)
        if self.cache_dir is not None and args.batched_aug != "off":
            self.loader = build_cached_loader(args, self.dataset, self.cache_dir, ctx)
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
        student, self.teacher = build_dino_models(args)
        self.student_module, self.teacher = student.to(ctx.device), self.teacher.to(ctx.device)
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
        ).to(ctx.device)
        self.optimizer = build_optimizer(args.optimizer, get_params_groups(self.student_module))
        self.scaler = build_grad_scaler(precision, ctx.device)
        student_forward, teacher_forward = self.student, self.teacher
        if args.compile:  # compiled forwards; parameters, state dicts and the EMA stay those of the plain modules
            student_forward, teacher_forward = torch.compile(self.student), torch.compile(self.teacher)
        self.state = DINOState(
            student_forward,
            teacher_forward,
            self.student_module,
            self.dino_loss,
            self.optimizer,
            self.scaler,
            ctx.device,
            precision,
            args.clip_grad,
            args.freeze_last_layer,
            koleo_weight=args.koleo_loss_weight,
            clip_grad_mode=args.clip_grad_mode,
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
        restore_state(
            checkpoint,
            self.run_state,
            student=self.student_module,
            teacher=self.teacher,
            optimizer=self.optimizer,
            scaler=self.scaler,
            dino_loss=self.dino_loss,
        )
        self.state.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
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
        a = self.args
        return evaluate_knn(self.teacher.backbone, *self.knn_data, self.ctx.device, a.batch_size_per_gpu, a.num_workers)

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
                epoch,
                rs["global_iter"],
                start_iter,
                args.max_iters,
                args.checkpoint_every,
                args.print_freq,
                args.max_nonfinite,
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
            record = {f"train_{k}": v for k, v in result.averages.items()} | {"epoch": epoch}
            record["train_wd"] = record.pop("train_weight_decay", record.get("train_wd"))
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
