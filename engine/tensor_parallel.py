"""A model split over processes with torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine (scheduler, sampler, tokenizer); ranks 1..N-1 are workers that hold their slices
(``engine.parallel``) and run every command rank 0 runs: before each forward pass rank 0 broadcasts the step's
integers once (``Leader.send``), and every rank builds the same step from them. The ranks meet by a torchrun-style
rendezvous (``MASTER_ADDR``, ``MASTER_PORT``); rank 0 starts the workers on its own host, unless ``WORLD_SIZE`` in
its environment says they are started elsewhere (other nodes: ``python -m engine.tp_worker``). Collectives time out
(``QWEN_SERVE_TP_TIMEOUT`` seconds), so a rank that dies or hangs fails the engine instead of hanging it.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.parallel import Shard
from engine.runner import Command, StepShape

log = logging.getLogger("qwen_serve.engine")
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet, and how many there are."""

    addr: str
    port: int
    world: int

    @classmethod
    def from_env(cls, world: int | None = None) -> Rendezvous:
        """``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE`` from the environment; a free loopback port when unset."""
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", 0)) or _free_port(addr)
        return cls(addr, port, world or int(os.environ["WORLD_SIZE"]))

    def env(self, rank: int) -> dict[str, str]:
        return {"MASTER_ADDR": self.addr, "MASTER_PORT": str(self.port), "WORLD_SIZE": str(self.world),
                "RANK": str(rank)}


def _free_port(addr: str) -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("QWEN_SERVE_TP_TIMEOUT", DEFAULT_TIMEOUT_S)))


def join(rendezvous: Rendezvous, rank: int, device: torch.device) -> None:
    """This process's place in the group (gloo on CPU, NCCL on CUDA); CPU threads shared out among local ranks."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{rendezvous.addr}:{rendezvous.port}", rank=rank,
                            world_size=rendezvous.world, timeout=timeout())
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rendezvous.world))


def worker_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank on CUDA (its local index), the CPU otherwise."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
    return torch.device("cuda", local)


class Leader:
    """Rank 0's side: the workers it started (if any), the setup it sends them, then one broadcast per command."""

    def __init__(self, rendezvous: Rendezvous, processes: list[subprocess.Popen]) -> None:
        self.rendezvous, self.processes = rendezvous, processes
        self.shard = Shard(0, rendezvous.world)

    @classmethod
    def start(cls, model: str | None, dtype: torch.dtype, device: torch.device, world: int) -> Leader:
        """Start workers 1..world-1 on this host (unless ``WORLD_SIZE`` is set: they join from elsewhere) and join
        the group as rank 0."""
        started_elsewhere = "WORLD_SIZE" in os.environ
        rendezvous = Rendezvous.from_env(None if started_elsewhere else world)
        if rendezvous.world != world:
            raise ValueError(f"WORLD_SIZE={rendezvous.world} but --tensor-parallel-size {world}")
        processes = []
        if not started_elsewhere:
            for rank in range(1, world):
                command = [sys.executable, "-m", "engine.tp_worker", "--dtype", str(dtype).removeprefix("torch."),
                           "--device", device.type, *(["--model", model] if model else [])]
                processes.append(subprocess.Popen(command, env={**os.environ, **rendezvous.env(rank)}))
        try:
            join(rendezvous, 0, device)
        except BaseException:
            for process in processes:
                process.kill()
            raise
        leader = cls(rendezvous, processes)
        atexit.register(leader.close)  # an offline LLM left open still stops its workers
        return leader

    def setup(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> None:
        """The cache every rank allocates (rank 0 sized it)."""
        dist.broadcast_object_list([(num_blocks, block_size, kv_cache_dtype)], src=0)

    def send(self, command: Command, ints: np.ndarray | None, shape: StepShape | None, extra: object) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited (status {process.returncode})")
        dist.broadcast_object_list([(command, ints, shape, extra)], src=0)

    def abandon(self) -> None:
        """Rank 0 could not load: end the workers without a word and leave the group."""
        for process in self.processes:
            process.kill()
            process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        """Stop the workers (they leave their loop) and leave the group (once)."""
        atexit.unregister(self.close)
        if not dist.is_initialized():
            return
        try:
            self.send(Command.STOP, None, None, None)
        except RuntimeError:
            log.warning("a tensor-parallel worker had already gone")
        for process in self.processes:
            try:
                process.wait(timeout=timeout().total_seconds())
            except subprocess.TimeoutExpired:
                process.kill()
        dist.destroy_process_group()


def receive() -> tuple:
    message: list[object] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]  # type: ignore[return-value]
