"""One DINO training step on a fixed batch, run alone or under torchrun; each process takes its slice of the batch.

Usage: python tests/train/dist_step_worker.py OUT.pth OPTIMIZER CENTERING   (or under torchrun --nproc_per_node=N)
Rank 0 saves the student and teacher state dicts after the step to OUT.pth.
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import random_crops, tiny_dino_models  # noqa: E402
from utils.runtime.distributed import cleanup, init_distributed_mode  # noqa: E402
from utils.train.loss import DINOLoss  # noqa: E402
from utils.train.optim import build_optimizer, get_params_groups  # noqa: E402
from utils.train.step import DINOState, StepSchedule, train_step  # noqa: E402

BATCH, OUT_DIM = 8, 64
ADAM_EPS = 1e-3  # updates proportional to the gradient below it, instead of lr * sign(rounding noise)


def main(out_path: str, optimizer_name: str, centering: str) -> None:
    ctx = init_distributed_mode("cpu", timeout_s=120)
    student, teacher = tiny_dino_models(OUT_DIM)
    crops = random_crops(1, BATCH)[0]
    per_rank = BATCH // ctx.world_size
    crops = [c[ctx.rank * per_rank : (ctx.rank + 1) * per_rank] for c in crops]
    wrapped = DistributedDataParallel(student) if ctx.world_size > 1 else student
    loss = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 10, centering=centering)
    optimizer = build_optimizer(optimizer_name, get_params_groups(student))
    if optimizer_name == "adamw":  # see test_two_process_step_equals_one_process_step_on_whole_batch
        for group in optimizer.param_groups:
            group["eps"] = ADAM_EPS
    state = DINOState(
        student=wrapped,
        teacher=teacher,
        student_module=student,
        loss=loss,
        optimizer=optimizer,
        scaler=None,
        device=ctx.device,
        clip_grad=0.5,
        freeze_last_layer=0,
    )
    for _ in range(2):
        train_step(
            state,
            crops,
            epoch=1,
            schedule=StepSchedule(lr=0.1 if optimizer_name == "sgd" else 1e-3, weight_decay=0.04, momentum=0.9),
        )
    if ctx.is_main:
        torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "center": loss.center}, out_path)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
