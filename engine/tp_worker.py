"""A tensor-parallel worker (rank 1..N-1): ``python -m engine.tp_worker --model M`` with ``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` set. Started by rank 0 on its host, or by hand / torchrun on other
nodes. It loads its slices of the model, allocates the cache rank 0 sized, then runs each command rank 0 sends
until told to stop; a failed collective (rank 0 gone) ends it with a non-zero status."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from engine.device import select_dtype
from engine.parallel import Shard
from engine.runner import Command, ModelRunner
from engine.tensor_parallel import Rendezvous, join, receive, worker_device
from engine.weights.loader import load_model


def serve(model: str | None, dtype: str, device: str) -> None:
    rank = int(os.environ["RANK"])
    rendezvous = Rendezvous.from_env()
    torch_device = worker_device(torch.device(device), rank)
    join(rendezvous, rank, torch_device)
    torch_dtype = select_dtype(dtype, torch_device)
    loaded = load_model(model, dtype=torch_dtype, device=torch_device, shard=Shard(rank, rendezvous.world))
    num_blocks, block_size, kv_cache_dtype = receive()
    runner = ModelRunner(loaded.model, loaded.model.config, num_blocks, block_size, torch_device, torch_dtype,
                         kv_cache_dtype)
    if torch_device.type == "cuda":  # the kernels rank 0's engine installs
        loaded.model.use_triton_kernels(block_size)
    with torch.inference_mode():
        while True:
            command, ints, shape, extra = receive()
            if command is Command.STOP:
                break
            runner.execute(command, ints, shape, extra)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="as rank 0's --model (default: the embedded model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    serve(args.model, args.dtype, args.device)


if __name__ == "__main__":
    main()
