"""``modules.norm_act.SyncBatchNorm`` on a CPU process group (gloo): two processes with unequal
batches give exactly what ``torch.nn.BatchNorm2d`` gives on the concatenated batch -- output,
input and parameter gradients, running statistics (exponential and cumulative) and eval output.
(``torch.nn.SyncBatchNorm`` itself raises for CPU inputs in a process group.)
"""
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modules.norm_act import SyncBatchNorm, batch_norm_layer

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch_norm_worker(rank, workdir, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD)
    try:
        data = torch.load(Path(workdir) / "bn.pt", weights_only=True)
        results = {}
        for momentum in (0.1, None):
            layer = SyncBatchNorm(3, momentum=momentum).train()
            layer.load_state_dict(data["state"])
            x = data["inputs"][rank].clone().requires_grad_(True)
            y = layer(x)
            (y * data["upstream"][rank]).sum().backward()
            results[momentum] = {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
                                 "running_mean": layer.running_mean, "running_var": layer.running_var,
                                 "eval": layer.eval()(data["inputs"][rank])}
        torch.save(results, Path(workdir) / f"bn{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_on_gloo_equals_batch_norm_on_the_whole_batch(tmp_path):
    """torch.nn.SyncBatchNorm refuses CPU inputs in a process group; this one gives BatchNorm2d's
    output, input and parameter gradients and running statistics of the concatenated batch."""
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 3, 4, 5, generator=gen) * 2 + 1, torch.randn(3, 3, 4, 5, generator=gen) - 0.5]
    upstream = [torch.randn(2, 3, 4, 5, generator=gen), torch.randn(3, 3, 4, 5, generator=gen)]
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([-1.5, 0.2, 0.7]))
        reference.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        reference.running_mean.copy_(torch.tensor([0.5, 0.0, -0.5]))
        reference.running_var.copy_(torch.tensor([2.0, 1.0, 0.5]))
    torch.save({"state": reference.state_dict(), "inputs": inputs, "upstream": upstream}, tmp_path / "bn.pt")
    mp.spawn(_batch_norm_worker, args=(str(tmp_path), free_port()), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(WORLD)]

    for momentum in (0.1, None):
        layer = torch.nn.BatchNorm2d(3, momentum=momentum)
        layer.load_state_dict(reference.state_dict())
        x = torch.cat(inputs).requires_grad_(True)
        y = layer(x)
        (y * torch.cat(upstream)).sum().backward()
        got = [r[momentum] for r in ranks]
        torch.testing.assert_close(torch.cat([r["y"] for r in got]), y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r["dx"] for r in got]), x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], layer.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[0]["db"] + got[1]["db"], layer.bias.grad, rtol=1e-4, atol=1e-5)
        for r in got:
            torch.testing.assert_close(r["running_mean"], layer.running_mean)
            torch.testing.assert_close(r["running_var"], layer.running_var)
        # momentum None averages cumulatively: after one batch the running stats ARE the batch's
        if momentum is None:
            torch.testing.assert_close(layer.running_var, torch.cat(inputs).var(dim=(0, 2, 3), unbiased=True))
        layer.eval()
        torch.testing.assert_close(torch.cat([r["eval"] for r in got]), layer(torch.cat(inputs)).detach())


def test_without_a_process_group_it_is_batch_norm():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 2, 2, generator=gen)
    layer, reference = SyncBatchNorm(3).train(), torch.nn.BatchNorm2d(3).train()
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert set(layer.state_dict()) == set(reference.state_dict())


def test_batch_norm_layer_keeps_torch_sync_batch_norm_on_cuda():
    assert batch_norm_layer(1, "cuda") is torch.nn.BatchNorm2d and batch_norm_layer(1, "cpu") is torch.nn.BatchNorm2d
    assert batch_norm_layer(2, "cuda") is torch.nn.SyncBatchNorm
    assert batch_norm_layer(2, "cpu") is SyncBatchNorm
