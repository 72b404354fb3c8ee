"""ParallelContext: the process groups of one run, built once from a DeviceMesh and passed around.

Mesh order (outermost to innermost): dp, pp, cp, tp, so tensor-parallel ranks are
neighbours (same node) and data-parallel replicas are furthest apart. Context-
parallel ranks hold the same weights and see the same samples, each a slice of the
sequence; their gradients are averaged together with dp's, over the dp x cp group
(which ZeRO-1 also shards over). No module keeps process groups in globals.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Config, ConfigError


@dataclass
class ParallelContext:
    world: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    cp_group: object = None
    grad_group: object = None  # dp x cp: replicas of the same weights, whose gradients are averaged
    embedding_group: object = None  # first + last pipeline stage, for tied embeddings
    mesh: object = None
    device: torch.device = torch.device("cpu")
    sequence_parallel: bool = False
    owns_group: bool = (
        False  # this run started the process group (and ends it); else its caller did
    )

    @property
    def grad_size(self) -> int:
        return self.dp * self.cp

    @property
    def grad_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def pp_peer(self, offset: int) -> int:
        """Global rank of the pipeline stage `offset` away (wrapping), same dp / tp position."""
        return dist.get_global_rank(self.pp_group, (self.pp_rank + offset) % self.pp)

    @property
    def is_logging_rank(self) -> bool:
        """One rank prints and writes metrics: the last stage's first tp / dp rank (it has the loss)."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0 and self.is_last_stage


def first_host(nodelist: str) -> str:
    """First host of a slurm node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    head = (
        nodelist.split(",")[0]
        if "[" not in nodelist.split(",")[0]
        else nodelist[: nodelist.index("]") + 1]
    )
    if "[" not in head:
        return head
    prefix, rng = head.split("[", 1)
    return prefix + rng.rstrip("]").split(",")[0].split("-")[0]


def slurm_rendezvous() -> None:
    """One task per GPU under srun: derive MASTER_ADDR / MASTER_PORT from the job when unset."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.setdefault(
            "MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
        )
        os.environ.setdefault(
            "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        )


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or slurm (srun, one task per GPU) variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return 0, 1, 0


def resolve_layout(cfg: Config, world: int) -> tuple[int, int, int, int]:
    """(tp, pp, cp, dp) for this world size, with every divisibility rule checked before any work: first
    what the model allows (so the fix never leads to a launch that fails on the next rule), then the world."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    tp, pp, cp = p.tp, p.pp, p.cp
    if m.num_heads % tp:
        raise ConfigError(
            "parallel.tp",
            tp,
            f"does not divide model.num_heads={m.num_heads}",
            "use a tp that divides the number of heads",
        )
    if m.kv_heads % tp:
        raise ConfigError(
            "parallel.tp",
            tp,
            f"does not divide the {m.kv_heads} kv heads",
            "use a tp that divides model.num_kv_heads",
        )
    if m.ffn_size % tp:
        raise ConfigError(
            "parallel.tp",
            tp,
            f"does not divide the MLP width {m.ffn_size}",
            "use a tp that divides model.ffn_hidden_size",
        )
    chunks = pp * (p.virtual_stages if p.schedule == "interleaved" else 1)
    if m.num_layers < chunks:
        raise ConfigError(
            "parallel.pp",
            pp,
            f"pp x virtual stages = {chunks} exceeds model.num_layers={m.num_layers}",
            "use fewer pipeline stages or virtual stages",
        )
    if p.schedule == "interleaved" and pp > 1 and m.num_layers % chunks:
        raise ConfigError(
            "parallel.virtual_stages",
            p.virtual_stages,
            f"pp x virtual_stages = {chunks} does not divide model.num_layers={m.num_layers}",
            "pick virtual_stages so that every model chunk holds the same number of layers",
        )
    if m.subsampled and chunks > 1:  # SUBLLM: each ( ... ) inside one stage
        from .stages import split_layers
        from ..config.structure import parse_structure, stage_starts

        try:
            split_layers(
                m.num_layers, chunks, stage_starts(parse_structure(m.structure, m.num_layers))
            )
        except ValueError as e:
            raise ConfigError(
                "parallel.pp",
                pp,
                f"cannot split model.structure={m.structure!r} into {chunks} stages or chunks: {e}",
                "use fewer pipeline stages, or a structure with more blocks outside its levels",
            ) from None
    model_ranks = tp * pp * cp
    if world % model_ranks:
        raise ConfigError(
            "parallel.tp",
            tp,
            f"tp * pp * cp = {model_ranks} does not divide the world size {world}",
            "choose tp, pp and cp whose product divides the number of processes",
        )
    dp = world // model_ranks if p.dp == "auto" else p.dp
    if model_ranks * dp != world:
        raise ConfigError(
            "parallel.dp",
            p.dp,
            f"tp * pp * cp * dp = {model_ranks * dp} != world size {world}",
            "set parallel.dp to auto or to world / (tp * pp * cp)",
        )
    gb = t.samples_per_step
    if gb % (t.micro_batch_size * dp):
        unset = " (unset, so one micro-batch)" if t.global_batch_size is None else ""
        raise ConfigError(
            "train.global_batch_size",
            t.global_batch_size,
            f"gives {gb} samples a step{unset}, not a multiple of micro_batch_size x dp = "
            f"{t.micro_batch_size} x {dp}",
            f"set train.global_batch_size to a multiple of {t.micro_batch_size * dp}",
        )
    micros = gb // (t.micro_batch_size * dp)
    if p.schedule == "interleaved" and pp > 1 and micros % pp:
        raise ConfigError(
            "train.global_batch_size",
            gb,
            f"gives {micros} micro-batches per step, not a multiple "
            f"of pp={pp} as the interleaved schedule needs",
            "make global_batch_size / (micro_batch_size * dp) a multiple of pp",
        )
    # cp's rules are checked at config load
    if p.sequence_parallel and tp > 1 and cfg.data.seq_len % tp:
        raise ConfigError(
            "parallel.sequence_parallel",
            True,
            f"data.seq_len={cfg.data.seq_len} is not a multiple of tp={tp}",
            "use a sequence length divisible by tp",
        )
    return tp, pp, cp, dp


def init_parallel(cfg: Config, device: torch.device) -> ParallelContext:
    """Join the process group (when launched with several processes) and build the groups."""
    slurm_rendezvous()
    rank, world, local = env_world()
    tp, pp, cp, dp = resolve_layout(cfg, world)
    if world == 1:
        return ParallelContext(device=device, sequence_parallel=False)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                "MASTER_ADDR",
                None,
                "not set for a multi-process run",
                "launch with torchrun or srun (see launch/), or export MASTER_ADDR / MASTER_PORT",
            )
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, pp, cp, tp), mesh_dim_names=("dp", "pp", "cp", "tp"))
    # [dp, pp, cp, tp] global ranks; every rank creates every group, in the same order
    ranks = mesh.mesh
    embedding_group = None
    if pp > 1:
        for d in range(dp):
            for c in range(cp):
                for t in range(tp):
                    pair = [int(ranks[d, 0, c, t]), int(ranks[d, pp - 1, c, t])]
                    group = dist.new_group(pair)
                    if rank in pair:
                        embedding_group = group
    dp_group = mesh["dp"].get_group()
    grad_group = dp_group
    if cp > 1:  # dp x cp: the replicas of one (pp, tp) position, dp-major as grad_rank counts them
        for s in range(pp):
            for t in range(tp):
                members = [int(r) for r in ranks[:, s, :, t].reshape(-1)]
                group = dist.new_group(members)
                if rank in members:
                    grad_group = group
    return ParallelContext(
        embedding_group=embedding_group,
        owns_group=owns,
        world=world,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        cp=cp,
        tp_rank=mesh["tp"].get_local_rank(),
        pp_rank=mesh["pp"].get_local_rank(),
        dp_rank=mesh["dp"].get_local_rank(),
        cp_rank=mesh["cp"].get_local_rank(),
        tp_group=mesh["tp"].get_group(),
        pp_group=mesh["pp"].get_group(),
        dp_group=dp_group,
        cp_group=mesh["cp"].get_group(),
        grad_group=grad_group,
        mesh=mesh,
        device=device,
        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
    )


def one_process_group(device: torch.device) -> None:
    """A process group of this process alone, for an engine that needs one in a one-process run (DeepSpeed,
    FSDP2). Kept for the process's life: such engines cache their groups, so a later run in this process (a
    sweep, a notebook) must find the same one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def shutdown(ctx: ParallelContext) -> None:
    """End the process group this run started; one started by the caller (several runs in one job) stays."""
    if not dist.is_initialized():
        return
    if ctx.world > 1:
        dist.barrier()  # gloo with subgroups crashes at exit without it
    if ctx.owns_group:
        dist.destroy_process_group()
