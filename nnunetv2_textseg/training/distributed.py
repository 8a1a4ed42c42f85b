"""Gradient averaging across nnU-Net's DDP ranks for parameters trained outside its DDP wrapper."""
from __future__ import annotations

import torch


def average_gradients_across_ranks(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the process group's ranks, in one all-reduce.

    A parameter without a gradient on this rank counts as a zero gradient (and gets one): another rank may have
    one, and every rank must take part in the reduction with the same buffer. One flat buffer instead of one
    all-reduce per parameter: BiCLIP's report pathways have hundreds of small parameters, and each collective
    costs a round trip between the ranks."""
    import torch.distributed as dist

    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)
