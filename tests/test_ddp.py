"""BiCLIPNetwork under DistributedDataParallel (2 processes, gloo, CPU) as nnU-Net wraps it:
find_unused_parameters=False, different data per rank, report dropout (also all reports dropped on one rank)."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_modules import NUM_CLASSES, TEXT_IN, make_net, trainer_style_loss, with_pos  # noqa: E402

EXTRA = ("text_pool", "null_text", "image_encoder", "fusion", "generator", "image_to_text", "iac_head")
WORLD = 2

pytestmark = pytest.mark.integration  # starts 2 processes that each import torch, ~17 s CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(rank: int, port: int):
    """gloo group for one worker. The ranks meet at a barrier and drop DDP before tearing the group down, so no
    rank closes its connections while its peer still uses them (the suspected cause of one worker's abort,
    "terminate called without an active exception", once in CI). A failing rank skips the barrier; the timeout
    ends its peer's wait."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, out_dir: str):
    with _process_group(rank, port):
        net = make_net(seed=0).train()  # same weights on every rank (DDP also broadcasts rank 0's)
        ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        results = []
        for step in range(2):
            g = torch.Generator().manual_seed(1000 * rank + step)  # different data per rank
            b = 2
            image = torch.randn(b, 1, 64, 64, generator=g)
            x = with_pos(image)
            xs = image + 0.3 * torch.randn(b, 1, 64, 64, generator=g)
            target = (torch.rand(b, 64, 64, generator=g) * NUM_CLASSES).long()
            tokens = torch.randn(b, 5, TEXT_IN, generator=g)
            mask = torch.ones(b, 5, dtype=torch.bool)
            if step == 0:
                drop = torch.tensor([rank == 1, False])
            else:
                drop = torch.ones(b, dtype=torch.bool) if rank == 1 else torch.zeros(b, dtype=torch.bool)
            opt.zero_grad(set_to_none=True)
            out = ddp(x, tokens, mask, drop=drop, x_strong=xs, return_aux=True)
            loss = trainer_style_loss(out, x, target)
            loss.backward()
            missing = [n for n, p in net.named_parameters() if p.grad is None]
            extra = [torch.cat([p.grad.flatten() for n, p in net.named_parameters() if n.startswith(k)])
                     for k in EXTRA]
            everything = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
            gathered = [torch.zeros_like(everything) for _ in range(WORLD)]
            dist.all_gather(gathered, everything)
            results.append({"missing": missing, "loss": float(loss),
                            "extra_norms": [float(e.norm()) for e in extra],
                            "max_diff": float((gathered[0] - gathered[1]).abs().max()),
                            "max_abs": float(everything.abs().max())})
            opt.step()
        params = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.zeros_like(params) for _ in range(WORLD)]
        dist.all_gather(gathered, params)
        torch.save({"steps": results, "param_diff": float((gathered[0] - gathered[1]).abs().max())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # its reducer holds the group: release it before the group goes


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_gradients_synchronised(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in res:
        assert r["param_diff"] == 0  # replicas stay identical after two optimiser steps
        for step, s in enumerate(r["steps"]):
            assert not s["missing"], (step, s["missing"])
            assert s["max_diff"] <= 1e-6 * max(1.0, s["max_abs"]), (step, s["max_diff"])  # all-reduced
            # every extra module gets gradient; at step 0 the image encoder's is exactly zero (the fusion's
            # last layer starts at zero, see test_modules), after one step it is trained too; at step 1 rank 1
            # dropped all its reports, but the all-reduced text-pool gradient comes from rank 0
            for k, norm in zip(EXTRA, s["extra_norms"]):
                if step == 0 and k == "image_encoder":
                    continue
                assert norm > 0, (step, k)
    # the ranks had different data: their losses differ, their (averaged) gradients do not
    assert res[0]["steps"][0]["loss"] != res[1]["steps"][0]["loss"]
    assert res[0]["steps"][1]["extra_norms"] == pytest.approx(res[1]["steps"][1]["extra_norms"], rel=1e-5)


def _cross_fitted_worker(rank: int, port: int, out_dir: str):
    """The default BiCLIP's network (4 cross-fitted pathways, token maps, segmentation gradient stopped) under DDP
    with find_unused_parameters=False: each rank's batch routes through only some pathways, others differ."""
    with _process_group(rank, port):
        net = make_net(seed=0, cross_fit=4, token_maps=True, token_window=3, seg_gradient_to_text=False).train()
        ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        missing = []
        for step in range(3):
            g = torch.Generator().manual_seed(1000 * rank + step)
            image = torch.randn(2, 1, 64, 64, generator=g)
            target = (torch.rand(2, 64, 64, generator=g) * NUM_CLASSES).long()
            tokens, mask = torch.randn(2, 5, TEXT_IN, generator=g), torch.ones(2, 5, dtype=torch.bool)
            fold = torch.tensor([0, 0]) if rank == 0 else torch.tensor([1, 2])  # pathway 3 fits / reads nothing
            fit = torch.tensor([1, 2]) if rank == 0 else torch.tensor([0, 0])   # on rank 0; pathway 3 nowhere
            opt.zero_grad(set_to_none=True)
            out = ddp(with_pos(image), tokens, mask, return_aux=True, fold=fold, fit=fit,
                      x_strong=image + 0.1 * torch.randn(2, 1, 64, 64, generator=g))
            trainer_style_loss(out, with_pos(image), target).backward()
            missing.append([n for n, p in net.named_parameters() if p.grad is None])
            opt.step()
        params = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.zeros_like(params) for _ in range(WORLD)]
        dist.all_gather(gathered, params)
        torch.save({"missing": missing, "param_diff": float((gathered[0] - gathered[1]).abs().max())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_cross_fitted_pathways_unused_on_a_rank(tmp_path):
    mp.spawn(_cross_fitted_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in res:
        assert r["param_diff"] == 0  # replicas identical after three steps
        assert not any(r["missing"]), r["missing"]  # every parameter in the graph (zero where unused)


def _averaging_worker(rank: int, port: int, out_dir: str):
    """BiCLIP's warm-up averages the report pathways' gradients by hand (the U-Net's DDP wrapper is not run there):
    different gradients per rank, a parameter without gradient on one rank, one collective for all of them."""
    from nnunetv2_textseg.training.distributed import average_gradients_across_ranks

    with _process_group(rank, port):
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
                  torch.nn.Parameter(torch.zeros(1))]
        grads = ([torch.full((3,), 1.0), None, torch.full((1,), 2.0)] if rank == 0 else
                 [torch.full((3,), 3.0), torch.full((2, 2), 4.0), None])
        for p, g in zip(params, grads):
            p.grad = g
        calls = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        try:
            average_gradients_across_ranks(params)
        finally:
            dist.all_reduce = real
        torch.save({"grads": [p.grad.clone() for p in params], "calls": len(calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_warm_up_gradients_averaged_in_one_collective(tmp_path):
    mp.spawn(_averaging_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["calls"] == 1
        expected = [torch.full((3,), 2.0), torch.full((2, 2), 2.0), torch.full((1,), 1.0)]  # a missing grad is 0
        for got, want in zip(res["grads"], expected):
            assert got.shape == want.shape and torch.equal(got, want)
