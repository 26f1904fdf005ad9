"""gpudl.optim.SGD on FSDP2-sharded parameters (DTensors), two CPU processes over gloo: every
process steps its own shards with the kernel, the momentum state stays sharded like the
parameter, and the result equals torch.optim.SGD on the same sharded model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, interpret, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        import gpudl
        from gpudl.optim import SGD

        mesh = init_device_mesh("cpu", (world,))
        finals = {}
        for name, make_opt, backend in (("gpudl", SGD, "triton"), ("torch", torch.optim.SGD, "torch")):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            fully_shard(model, mesh=mesh)
            opt = make_opt(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
            torch.manual_seed(1 + rank)
            with gpudl.use_backend(backend):
                for _ in range(3):
                    opt.zero_grad()
                    model(torch.randn(4, 8)).square().mean().backward()
                    opt.step()
            p = next(model.parameters())
            buffer = opt.state[p]["momentum_buffer"]
            assert isinstance(p, DTensor) and isinstance(buffer, DTensor)
            assert buffer.placements == p.placements and buffer.to_local().shape == p.to_local().shape
            finals[name] = [q.full_tensor() for q in model.parameters()]
        for a, b in zip(finals["gpudl"], finals["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        results[rank] = "ok"
    except Exception as exc:  # reported to the parent test
        results[rank] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()


def test_sgd_steps_fsdp2_sharded_parameters_on_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), os.environ.get("TRITON_INTERPRET") == "1", results), nprocs=2)
    assert dict(results) == {0: "ok", 1: "ok"}
