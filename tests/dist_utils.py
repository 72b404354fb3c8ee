"""Run a function on N spawned processes joined by gloo; collect what each returns."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    for _ in range(100):  # in [20000, 40000): slurm's port rule maps a job id there
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return port
    raise RuntimeError("no free port in [20000, 40000)")


def _worker(rank, world, port, fn, args, queue, env, slurm_nodes, threads):
    if slurm_nodes:  # what srun gives each task: no RANK / MASTER_* at all
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ.update(
            {
                "SLURM_PROCID": str(rank),
                "SLURM_NTASKS": str(world),
                "SLURM_NNODES": str(slurm_nodes),
                "SLURM_LOCALID": str(rank % (world // slurm_nodes)),
                "SLURM_JOB_NODELIST": "localhost",
                "SLURM_JOB_ID": str(port - 20000),
            }
        )
    else:
        os.environ.update(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)  # the parent's share of the cores, split among the ranks
    try:
        queue.put((rank, fn(rank, world, *args), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


def run_distributed(fn, world: int, *args, timeout: float = 240, env=None, slurm_nodes: int = 0):
    """fn(rank, world, *args) runs in each process (a module-level function); returns results by rank.
    With slurm_nodes, processes see only the SLURM_* variables srun sets (one task per GPU)."""
    import torch

    threads = max(1, torch.get_num_threads() // world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world, port, fn, args, queue, env or {}, slurm_nodes, threads)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=timeout)
            if err:
                errors.append(f"rank {rank}:\n{err}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def init_gloo(world):
    """Join the group and return (tp group == world) helpers for layer tests."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
    return dist.group.WORLD


def train_layouts(rank, world, config_of, corpus, root, layouts):
    """On each spawned rank: one Trainer run per layout, into root/NAME (config_of(corpus, dir, parallel))."""
    import torch.distributed as dist
    from pathlib import Path

    from megatron_sep.training import Trainer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, parallel in layouts.items():
        Trainer(config_of(corpus, Path(root) / name, parallel)).run()
    dist.destroy_process_group()
    return True
