"""The DINO head's weight-normalised last layer, ``y = x @ (g * V / ||V||).T``, as one fused autograd function.

:func:`weight_norm_linear` scales the *outputs* instead of the weight (no ``W`` is formed) and works through ``V`` in
blocks of rows that fit a core's L2 cache: per block, one matrix product forward; one for ``dx``, one for ``dV`` and
its norm correction while the block is hot, backward.

Shapes: ``x`` ``[N, K]``, ``V`` (``weight_v``) ``[D, K]``, ``g`` (``weight_g``) ``[D, 1]``, output ``[N, D]``.
With ``n = ||V_j||`` and ``s = g / n`` per row ``j``, ``y[:, j] = s_j * (x @ V_j)``, and for an upstream gradient
``dy``:

- ``dx = (dy * s) @ V``
- ``dV_j = s_j * (G_j - (u_j / n_j**2) * V_j)`` with ``G = dy.T @ x`` and ``u_j = G_j . V_j``
- ``dg_j = u_j / n_j``

The fused path runs on the CPU in float32/float64 outside autocast and ``torch.compile``; elsewhere (GPUs, mixed
precision, compiled graphs) the layer is the plain composition, whose kernels the device or the compiler fuses.
The forward multiplies ``V_block @ x.T``; its rounding can depend on the number of rows ``N`` (the BLAS picks its
kernels by shape), i.e. a row's outputs may differ in the last bit between batch sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Bytes of ``V`` per block: a block and its gradient stay in a core's L2 cache.
CPU_BLOCK_BYTES = 2 * 1024 * 1024


def weight_norm_linear(x: torch.Tensor, weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
    """``x @ (weight_g * weight_v / ||weight_v||).T`` (row norms): ``[N, K]``, ``[D, K]``, ``[D, 1]`` → ``[N, D]``."""
    if uses_fused_path(x, weight_v):
        rows = max(1, CPU_BLOCK_BYTES // (weight_v.shape[1] * weight_v.element_size()))
        return _WeightNormLinear.apply(x, weight_v, weight_g, rows)
    return F.linear(x, weight_v * (weight_g / weight_v.norm(dim=1, keepdim=True)))


def uses_fused_path(x: torch.Tensor, weight_v: torch.Tensor) -> bool:
    """Whether :func:`weight_norm_linear` takes the fused blockwise path for these inputs."""
    return (
        x.device.type == "cpu"
        and weight_v.device.type == "cpu"
        and x.dtype == weight_v.dtype
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 2
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _blocks(total: int, rows: int):
    return (slice(start, min(start + rows, total)) for start in range(0, total, rows))


class _WeightNormLinear(torch.autograd.Function):
    """The fused forward and backward of :func:`weight_norm_linear` (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight_v, weight_g, rows):
        norms = torch.linalg.vector_norm(weight_v, dim=1)  # [D]
        scale = weight_g.reshape(-1) / norms  # s = g / n, [D]
        out = x.new_empty(x.shape[0], weight_v.shape[0])
        for block in _blocks(weight_v.shape[0], rows):
            torch.mul(torch.mm(weight_v[block], x.T).T, scale[block], out=out[:, block])
        ctx.rows = rows
        ctx.save_for_backward(x, weight_v, norms, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight_v, norms, scale = ctx.saved_tensors
        need_x, need_v, need_g = ctx.needs_input_grad[:3]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_v = torch.empty_like(weight_v) if need_v or need_g else None
        dots = torch.empty_like(norms) if need_v or need_g else None  # u = (dy.T @ x) . V, row-wise
        for block in _blocks(weight_v.shape[0], ctx.rows):
            v, dy = weight_v[block], grad_out[:, block]
            if need_x:
                grad_x.addmm_(dy * scale[block], v)
            if grad_v is None:
                continue
            g_block = torch.mm(dy.T, x, out=grad_v[block])  # G = dy.T @ x
            u = torch.linalg.vecdot(g_block, v, out=dots[block])
            if need_v:
                n = norms[block]
                g_block.addcmul_(v, (u / (n * n)).neg_().unsqueeze(1)).mul_(scale[block].unsqueeze(1))
        grad_g = (dots / norms).unsqueeze(1) if need_g else None
        return grad_x, grad_v if need_v else None, grad_g, None
