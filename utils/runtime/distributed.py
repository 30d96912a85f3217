"""Process-group set-up and collectives that work the same on one CPU, torchrun, and SLURM's srun.

Launchers are recognised from their environment:
- torchrun / torch.distributed.launch: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- SLURM (srun or submitit): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of
  ``SLURM_JOB_NODELIST`` as master, a port derived from ``SLURM_JOB_ID``;
- nothing: one process, no process group (every collective below is then the identity).
NCCL is used when the process owns a CUDA device, gloo otherwise.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of processes, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The rendezvous variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) that
    the launcher of this process provides, or None when it runs alone. Pure: reads ``environ`` (default os.environ)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        job_id = env.get("SLURM_JOB_ID", "0")
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(job_id)),
        }
    return None


def slurm_port(job_id: str) -> int:
    """A rendezvous port in [20000, 30000) derived from the SLURM job id, the same on every task of the job."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits[-4:]) % 10000


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as ``node[003-005,7],gpu1`` (``scontrol`` when present)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    match = re.match(r"^([^\[]+)\[([^\],-]+)", head)
    return match.group(1) + match.group(2) if match else head


def cpus_per_process(environ: dict[str, str] | None = None) -> int:
    """The CPUs this process may use, at least 1: ``SLURM_CPUS_PER_TASK`` under srun; otherwise the CPUs of its
    affinity mask (``os.cpu_count()`` where there is none) shared among the processes of this node
    (``LOCAL_WORLD_SIZE``, which torchrun sets). Never torch's thread count: torchrun sets ``OMP_NUM_THREADS=1``."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local_world = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    return max(1, cpus // max(local_world, 1))


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    """``cuda:<local_rank>`` when CUDA is usable (and not refused by ``device='cpu'``), else the CPU."""
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        return torch.device(device)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed_mode(device: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the launcher's process group (if any) and choose this process's device.

    The process group has a timeout (``timeout_s`` seconds) so that, when one rank dies, the others fail within it
    instead of hanging. With no launcher this returns a one-process context without creating a group.
    """
    env = launcher_env()
    if env is None:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=pick_device(0, device))
    os.environ.update(env)
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(cpus_per_process())
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes, in place, returned for chaining."""
    if is_dist():
        dist.all_reduce(tensor)
        tensor.div_(get_world_size())
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes, in place, returned for chaining."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place, returned for chaining."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_uneven(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors whose first dimension differs across processes; returns one tensor per rank, in rank order.

    Each process pads its tensor to the largest first dimension, gathers, then trims, so uneven last batches work.
    """
    if not is_dist():
        return [tensor]
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return [chunk[:n] for chunk, n in zip(chunks, counts)]


def cleanup() -> None:
    """Destroy the process group, if any (end of a script)."""
    if is_dist():
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (any picklable object), in rank order; ``[obj]`` when running alone."""
    if not is_dist():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
