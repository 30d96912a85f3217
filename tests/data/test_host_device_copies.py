"""Host→device copies and host synchronisations of the batched augmentation and the cached loader, counted on the
CPU with the accelerator's code path (a CPU proxy for a GPU run).

On a GPU every ``.to(device)`` of an unpinned host tensor is a copy followed by a synchronisation, and every
``.item()`` / ``bool(tensor)`` of a device tensor (``aten::_local_scalar_dense``) waits for the device. The CPU has
neither, so the test counts the calls that would be them: every ``Tensor.to`` (and tensor creation) that names a
target device, and every ``_local_scalar_dense`` seen by a dispatch mode, while the loader and the batched
augmentation run the tensor path (``compiled=False``, whole batch at once, no workspace: what they do off the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils.data.augment.batched import BatchedMultiCrop
from utils.data.device_loader import CachedMultiCropLoader
from utils.data.sampling import ResumableSampler

BATCH, LOCAL_CROPS, BATCHES = 16, 2, 3
VIEWS = 2 + LOCAL_CROPS


class Spy(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (``.item()``, ``bool``, ``int``, ``float`` of a tensor) and, through
    patched ``Tensor.to`` / ``torch.tensor`` / ``torch.as_tensor``, the calls that move host data to a named
    device (each a host→device copy when that device is an accelerator), with their bytes."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.scalar_reads = 0
        self.transfers: list[int] = []
        original_to, original_tensor, original_as_tensor = torch.Tensor.to, torch.tensor, torch.as_tensor
        spy = self

        def names_device(args, kwargs) -> bool:
            if kwargs.get("device") is not None:
                return True
            return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)

        def to(tensor, *args, **kwargs):
            if names_device(args, kwargs):
                spy.transfers.append(tensor.numel() * tensor.element_size())
            return original_to(tensor, *args, **kwargs)

        def tensor(data, *args, **kwargs):
            out = original_tensor(data, *args, **kwargs)
            if kwargs.get("device") is not None:
                spy.transfers.append(out.numel() * out.element_size())
            return out

        def as_tensor(data, *args, **kwargs):
            out = original_as_tensor(data, *args, **kwargs)
            if kwargs.get("device") is not None:
                spy.transfers.append(out.numel() * out.element_size())
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch, "tensor", tensor)
        monkeypatch.setattr(torch, "as_tensor", as_tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


class FakeCache(torch.utils.data.Dataset):
    """The part of :class:`utils.data.image_cache.CachedImages` the loader uses, over an in-memory uint8 tensor."""

    def __init__(self, n: int = 64, size: int = 32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.arange(n) % 5

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def get_batch(self, indices, out=None):
        images = self.images[torch.as_tensor(indices)]
        return (out.copy_(images) if out is not None else images), self.labels[torch.as_tensor(indices)]

    def load_into_memory(self, device="cpu"):
        return self.images.clone().to(device)


def accelerator_path_augment(batch: int = BATCH) -> BatchedMultiCrop:
    """The batched augmentation as it runs off the CPU: tensor operations, the whole batch at once, no workspace."""
    return BatchedMultiCrop(
        local_crops_number=LOCAL_CROPS,
        global_crop_size=32,
        local_crop_size=16,
        chunk_size=batch,
        reuse_buffers=False,
        compiled=False,
    )


@pytest.mark.parametrize("images_on_device", [False, True])
def test_loader_and_augmentation_copy_once_per_view_and_never_synchronise(monkeypatch, images_on_device):
    cache = FakeCache()
    sampler = ResumableSampler(cache, num_replicas=1, rank=0, seed=0)
    loader = CachedMultiCropLoader(
        cache, sampler, BATCH, accelerator_path_augment(), torch.device("cpu"), 0, 0, images_on_device=images_on_device
    )
    batches = iter(loader)
    next(batches)  # first batch: cached tables (resampling weights, grey weights) are made on the device
    spy = Spy(monkeypatch)
    with spy:
        for _ in range(BATCHES):
            crops, _, _ = next(batches)
    assert [c.shape[0] for c in crops] == [BATCH] * VIEWS
    # one packed parameter buffer per view, one copy of the batch's images (or of its indices)
    assert len(spy.transfers) <= BATCHES * (VIEWS + 1), f"{len(spy.transfers)} host→device copies in {BATCHES} batches"
    assert spy.scalar_reads == 0, f"{spy.scalar_reads} host reads of tensors (.item()/bool) in {BATCHES} batches"


def test_the_spy_sees_copies_and_reads(monkeypatch):
    """The counters can fail: a plain ``.to(device)``, ``torch.tensor(..., device=)`` and ``bool(tensor)`` count."""
    spy = Spy(monkeypatch)
    with spy:
        x = torch.ones(4).to("cpu")
        torch.tensor([1.0, 2.0], device="cpu")
        bool(x.any())
        x.to(torch.float64)  # a dtype change is no transfer
    assert spy.transfers == [16, 8]
    assert spy.scalar_reads == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("images_on_device", [False, True])
def test_on_cuda_no_synchronisation_and_the_cpu_results(monkeypatch, images_on_device):
    """On a real GPU: batches made with PyTorch's synchronisation check set to error (a blocking copy or a read of a
    device value raises), prefetched on a side stream, equal to the same batches made on the CPU."""
    device = torch.device("cuda")
    cache = FakeCache()

    def loader(on: torch.device, prefetch: int) -> CachedMultiCropLoader:
        sampler = ResumableSampler(cache, num_replicas=1, rank=0, seed=0)
        on_device = images_on_device and on.type == "cuda"
        augment = accelerator_path_augment()
        return CachedMultiCropLoader(cache, sampler, BATCH, augment, on, 0, 0, on_device, prefetch=prefetch)

    expected = [crops for crops, _, _ in loader(torch.device("cpu"), 0)]
    # full float32 matmuls and convolutions (TF32 would differ from the CPU by ~1e-3)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    batches = iter(loader(device, 1))
    first, _, _ = next(batches)  # cached tables made on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [first] + [crops for crops, _, _ in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == len(expected)
    for crops_gpu, crops_cpu in zip(got, expected, strict=True):
        for a, b in zip(crops_gpu, crops_cpu, strict=True):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=0)
