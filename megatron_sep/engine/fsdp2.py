"""The FSDP2 engine: PyTorch's `fully_shard` over the data-parallel ranks (dp, or dp x cp flattened, as
ZeRO-1 shards over them), one unit per block plus the root (embeddings, head, norms, a variant's own modules),
around a model parallel/parallelize.py already transformed (our tensor and context parallelism stay as
they are: FSDP2 shards each rank's tensor-parallel shard). Weights, gradients and Adam state are sharded;
bf16 compute with fp32 reduction on CUDA; `parallel.offload: optimizer+params` is FSDP2's CPU offload.

Checkpoints are the native engine's files: each weight and Adam state gathered over the shard group to this
rank's tensor-parallel shard and saved as checkpoint/state.py wraps it, so a run resumes across native,
DeepSpeed and FSDP2 and `export-hf` reads it. (The save holds one rank's tp shard of the model whole.)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from ..checkpoint.state import unwrap, wrap
from ..config import Config, ConfigError
from ..parallel.context import ParallelContext, one_process_group
from ..parallel.data import global_grad_norm
from ..parallel.parallelize import Parallelized
from ..parallel.params import info, mark
from .native import TorchOptimEngine, decay_groups, lr_scales


def shard_mesh(ctx: ParallelContext):
    """The 1-D mesh FSDP2 shards over: dp, or dp x cp flattened (the ranks whose gradients are averaged)."""
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.mesh is None:  # one process: FSDP2 still wants a process group and a mesh
        one_process_group(ctx.device)
        return init_device_mesh(ctx.device.type, (1,), mesh_dim_names=("dp",))
    if ctx.cp == 1:
        return ctx.mesh["dp"]
    return ctx.mesh["dp", "cp"]._flatten("dp_cp")


class FSDP2Engine(TorchOptimEngine):
    """The model as FSDP2 holds it, behind the engine protocol (engine/__init__.py)."""

    def __init__(self, part: Parallelized, cfg: Config, ctx: ParallelContext):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
        from torch.distributed.fsdp import fully_shard

        self.ctx, self.cfg, self.pipe = ctx, cfg, part.pipe
        self.mesh = shard_mesh(ctx)
        model = part.model.to(ctx.device)
        bf16 = ctx.device.type == "cuda" and cfg.train.precision in ("auto", "bf16", "fp8")
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        offload = cfg.parallel.offload == "optimizer+params"
        if offload and ctx.device.type != "cuda":
            raise ConfigError(
                "parallel.offload",
                cfg.parallel.offload,
                "is FSDP2's CPU offload, which moves shards between a GPU and host memory: it needs CUDA",
                "use offload: none on CPU",
            )
        kw = {
            "mesh": self.mesh,
            "mp_policy": mp,
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        }
        self.infos = {n: info(p) for n, p in model.named_parameters(remove_duplicate=False)}
        for block in model.blocks():
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        self.model = model
        model.set_requires_gradient_sync(False)  # reduce-scatter on the step's last backward only
        o = cfg.optim
        groups = decay_groups(list(model.parameters()), o.weight_decay, lr_scales(model))
        # fused, as the native engine: one pass over the shards, and grad_scale / found_inf carry the
        # clipping and the non-finite skip without a host sync before the update
        self.opt = torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True
        )

    @property
    def describe(self) -> str:
        off = " offload" if self.cfg.parallel.offload != "none" else ""
        return f" fsdp2 over {self.mesh.size()}{off}"

    def before_last_backward(self) -> None:
        self.model.set_requires_gradient_sync(True)

    def _marked(self) -> None:
        """fully_shard (and its lazy init at the first forward) makes new parameters: give them back what
        parallelism did to each (ParamInfo: the grad norm and the checkpoint's tp layout read it)."""
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if info(p) != self.infos[n]:
                mark(p, **dataclasses.asdict(self.infos[n]))

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Clip by the global norm (the shards' squares summed over the shard, tp and pp groups) and update;
        a non-finite norm or loss drops the update."""
        self._marked()
        params = list(self.model.parameters())
        pairs = [(unwrap(p.grad) if p.grad is not None else None, p) for p in params]
        norm = global_grad_norm(pairs, self.ctx, sharded_over_dp=False, loss=loss)
        if self.mesh.size() > 1:  # the shard group (dp, or dp x cp): FSDP2's, not ctx.grad_group
            sq = norm.square()
            dist.all_reduce(sq, group=self.mesh.get_group())
            norm = sq.sqrt()
        clip = self.cfg.optim.clip_grad
        self.opt.grad_scale = ((norm + 1e-6) / clip).clamp(min=1.0) if clip > 0 else None
        self.opt.found_inf = (~norm.isfinite()).float()
        self.opt.step()
        del self.opt.grad_scale, self.opt.found_inf
        self.opt.zero_grad(set_to_none=True)
        self.model.set_requires_gradient_sync(False)
        return norm, math.isfinite(norm.item())

    def weights_finite(self) -> bool:
        """Collective: no rank's shard holds a NaN or inf weight."""
        parts = [unwrap(p).detach().isfinite().all() for p in self.model.parameters()]
        bad = (~torch.stack(parts).all()).float().reshape(1).to(self.ctx.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        return bad.item() == 0.0

    # ---- checkpoints: the native layout (checkpoint/state.py) ----
    def _named(self):
        self._marked()
        return dict(self.model.named_parameters(remove_duplicate=False))

    def _ensure_states(self) -> None:
        for p in self.model.parameters():
            st = self.opt.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)

    def state_dict(self) -> dict:
        """Collective: every weight and Adam state whole over the shard group, as this rank's tp shard."""
        self._ensure_states()
        named, ctx = self._named(), self.ctx
        model = {
            n: wrap(self._full(t), named.get(n), ctx) for n, t in self.model.state_dict().items()
        }
        optim = {}
        for n, p in self.model.named_parameters():
            st = self.opt.state[p]
            optim[n] = {k: wrap(self._full(st[k]), p, ctx) for k in ("exp_avg", "exp_avg_sq")}
            optim[n]["step"] = st["step"].detach().float().cpu().clone()
        return {"model": model, "optim": optim}

    def _full(self, t):
        return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()

    def load_state_dict(self, read, with_optimizer: bool) -> None:
        """read(state) fills whole (tp-shard) tensors; each rank keeps its FSDP2 shard of them."""
        named, ctx = self._named(), self.ctx
        dev = self.ctx.device

        def blank(p):
            return wrap(torch.empty(p.shape, dtype=torch.float32, device=dev), p, ctx)

        state = {"model": {n: blank(named[n]) for n in self.model.state_dict()}}
        if with_optimizer:
            self._ensure_states()
            state["optim"] = {
                n: {"exp_avg": blank(p), "exp_avg_sq": blank(p), "step": torch.zeros(())}
                for n, p in self.model.named_parameters()
            }
        read(state)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                self._keep_shard(p, unwrap(state["model"][n]))
                if with_optimizer:
                    st, src = self.opt.state[p], state["optim"][n]
                    for k in ("exp_avg", "exp_avg_sq"):
                        self._keep_shard(st[k], unwrap(src[k]))
                    st["step"].copy_(src["step"])

    def _keep_shard(self, dst, full) -> None:
        """Copy this rank's FSDP2 shard (torch.chunk along dim 0, as fully_shard cuts) of `full` into dst."""
        local = unwrap(dst)
        n, r = self.mesh.size(), self.mesh.get_local_rank()
        chunks = torch.chunk(full, n, dim=0)
        mine = chunks[r] if r < len(chunks) else full[:0]
        local.copy_(mine.to(local.dtype).reshape(local.shape))
