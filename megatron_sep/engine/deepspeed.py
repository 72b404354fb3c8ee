"""DeepSpeed as the data-parallel engine: ZeRO-1/2/3 and CPU offload around the project's own model.

The model, the batch plan, SepLLM attention and the one-stage schedule stay ours; DeepSpeed
wraps the model and an AdamW with the same parameter groups, reduces and partitions the
gradients, clips, and steps. Its JSON is generated from our config (`ds_config`) and an
expert's `parallel.deepspeed` mapping is merged over it.

Checkpoints stay ours: the full fp32 weights and Adam states are gathered one parameter at a
time (every rank joins each gather; one rank keeps it) and written through the same atomic
DCP save as the native engine, under the plain model's names. A load reads them back in
parts of about `LOAD_PART_BYTES` and scatters them into DeepSpeed's partitions, so a
checkpoint moves freely between engines and layouts, and export-hf reads it as it is.

What DeepSpeed does not serve with our layers is rejected at config load
(config/schema.py, `_check_engine`): tp, pp and cp > 1, zero 0, fp8, and weight offload
without ZeRO-3; so are parallel.deepspeed keys the installed DeepSpeed does not read, or values
it cannot (`check_expert_keys`, config/deepspeed.py).
"""

from __future__ import annotations

import json
import math
import os
import warnings

import torch
import torch.distributed as dist

from ..config import Config
from ..config.deepspeed import _config_problem, ds_config, import_deepspeed
from ..parallel.context import ParallelContext, env_world, one_process_group
from ..parallel.parallelize import Parallelized
from .native import decay_groups, lr_scales

LOAD_PART_BYTES = 1 << 30  # fp32 weights + Adam states read per part of a load, per rank


def _shape(p) -> tuple:
    # ZeRO-3 keeps the full shape aside from its partition
    return tuple(getattr(p, "ds_shape", p.shape))


class DeepSpeedEngine:
    """The model as DeepSpeed holds it, behind the engine protocol (engine/__init__.py)."""

    def __init__(self, part: Parallelized, cfg: Config, ctx: ParallelContext):
        deepspeed = import_deepspeed()
        self.ctx, self.cfg = ctx, cfg
        # DeepSpeed asserts it; srun and one process lack it
        os.environ.setdefault("LOCAL_RANK", str(env_world()[2]))
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device.index or 0)
        one_process_group(ctx.device)  # one process: DeepSpeed still wants a process group
        bf16 = ctx.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        self.ds_config = ds_config(cfg, ctx.dp, bf16)
        # one stage: the same schedule code as the native engine
        self.pipe, model = (part.pipe, part.model)
        o, p = cfg.optim, cfg.parallel
        groups = decay_groups(list(model.parameters()), o.weight_decay, lr_scales(model))
        # DeepSpeed's vectorised Adam for CPU states
        if p.offload != "none" and ctx.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(
                groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True
            )
        else:  # on a CPU-only run the states already live on the CPU: torch's AdamW, no C++ build
            fused = ctx.device.type == "cuda" and p.offload == "none"
            opt = torch.optim.AdamW(
                groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused
            )
        # ZeRO-3 calls collectives that torch marks deprecated, on every step of every rank: not the user's to fix
        warnings.filterwarnings(
            "ignore",
            r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
            r"is deprecated",
            FutureWarning,
        )
        try:
            self.engine, self.opt, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, config=self.ds_config, dist_init_required=False
            )
        except Exception as e:
            raise _config_problem(e) from None
        self.model = self.engine.module
        # the fused loss reads lm_head.weight outside lm_head's forward
        if cfg.model.fused_loss and p.zero == 3:
            deepspeed.zero.register_external_parameter(self.model, self.model.lm_head.weight)
        # torch's (or DeepSpeed's CPU) Adam over DeepSpeed's flat partitions
        self.base = self.opt.optimizer
        self._ensure_states()
        self.micros = self.ds_config["gradient_accumulation_steps"]
        self.backwards = 0

    def forward_backward(self, micro_batches, forward_only: bool = False) -> torch.Tensor:
        return self.pipe.run(micro_batches, self, forward_only)

    def forward(self, tokens, labels, position_ids, batch):
        # through DeepSpeed's module hooks (ZeRO-3)
        return self.engine(tokens, labels, position_ids, batch)

    def before_last_backward(self) -> None:
        pass  # DeepSpeed reduces gradients in its own backward

    def backward(self, loss) -> None:
        """DeepSpeed's documented accumulation loop: step() after every micro-batch's backward; it only counts
        the micro-steps until the last, whose step() (in self.step) updates."""
        # the schedule already divided by the micro-batches
        self.engine.backward(loss, scale_wrt_gas=False)
        self.backwards += 1
        if self.backwards < self.micros:
            self.engine.step()

    @property
    def describe(self) -> str:
        off = "" if self.cfg.parallel.offload == "none" else f" offload={self.cfg.parallel.offload}"
        return f" deepspeed zero{self.cfg.parallel.zero}{off}"

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """DeepSpeed reduces, clips and steps; it drops the update itself when the gradient norm is not
        finite. A non-finite loss with a finite norm is reported as skipped too."""
        assert self.backwards == self.micros, (self.backwards, self.micros)
        self.backwards = 0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("inf") if norm is None else float(norm))
        bad = torch.tensor([0.0 if loss is None else float(not torch.isfinite(loss).all())])
        if self.ctx.world > 1:
            dist.all_reduce(bad)
        return norm, math.isfinite(norm.item()) and bad.item() == 0.0

    def weights_finite(self) -> bool:
        """Collective: no rank's partition holds a NaN or inf weight."""
        parts = [getattr(p, "ds_tensor", p).detach() for p in self.model.parameters()]
        bad = (
            (~torch.stack([t.isfinite().all() for t in parts]).all())
            .float()
            .reshape(1)
            .to(self.ctx.device)
        )
        if self.ctx.world > 1:
            dist.all_reduce(bad)
        return bad.item() == 0.0

    # ---- checkpoints: the plain model's names, full fp32 tensors --------------------------------
    def _named(self):
        # tied weights once, as the native optimizer state
        return list(self.model.named_parameters())

    def _full(self, p, key=None) -> torch.Tensor:
        """Collective: the whole fp32 weight (key None) or Adam state of p, gathered from the partitions."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return out.reshape(_shape(p)).float()

    def _ensure_states(self) -> None:
        """Adam states exist from the start (zeros, step 0, as a first step would make them), so they can be
        read before the first step and loaded into; ZeRO-1/2 then link them to the parameters' fragments."""
        # ZeRO-3: put in its groups per step
        flats = getattr(self.opt, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = [flat for group in self.base.param_groups for flat in group["params"]]
        for flat in flats:
            st = self.base.state[flat]
            if "step" not in st:
                on = flat.device if self.base.defaults.get("fused") else "cpu"
                st["step"] = (
                    torch.zeros((), device=on) if isinstance(self.base, torch.optim.AdamW) else 0
                )
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in st:
                    st[key] = torch.zeros_like(flat)
        link = getattr(self.opt, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def _step_count(self) -> float:
        st = next(iter(self.base.state.values()), {})
        return float(st.get("step", 0))

    def _set_step_count(self, value: float) -> None:
        for st in self.base.state.values():
            if torch.is_tensor(st["step"]):
                st["step"].fill_(value)
            else:
                st["step"] = int(value)

    def state_dict(self) -> dict:
        """This rank's share of the checkpoint: every rank joins every gather, rank i % world keeps the i-th
        parameter (on the CPU), so no rank ever holds the whole model."""
        rank, world = self.ctx.rank, self.ctx.world
        step = torch.tensor(self._step_count())
        model, optim = {}, {}
        tied = self.model.lm_head.weight is self.model.embed.weight
        for i, (name, p) in enumerate(self._named()):
            values = {key: self._full(p, key) for key in (None, "exp_avg", "exp_avg_sq")}
            if i % world != rank:
                continue
            model[name] = values[None].cpu()
            optim[name] = {
                "exp_avg": values["exp_avg"].cpu(),
                "exp_avg_sq": values["exp_avg_sq"].cpu(),
                "step": step.clone(),
            }
            if tied and name == "embed.weight":
                model["lm_head.weight"] = model[name]
        return {"model": model, "optim": optim}

    def load_state_dict(self, read, with_optimizer: bool) -> None:
        """Read the checkpoint in parts of about LOAD_PART_BYTES and scatter each into the partitions."""
        named, part, size = self._named(), [], 0
        per = 3 if with_optimizer else 1
        step = None
        for i, (name, p) in enumerate(named):
            part.append((name, p))
            size += per * 4 * math.prod(_shape(p))
            if size >= LOAD_PART_BYTES or i == len(named) - 1:
                step = self._load_part(read, part, with_optimizer)
                part, size = [], 0
        if with_optimizer and step is not None:
            self._set_step_count(step)

    def _load_part(self, read, part, with_optimizer: bool):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        shape = {n: _shape(p) for n, p in part}
        state = {"model": {n: torch.empty(shape[n]) for n, _ in part}}
        if with_optimizer:
            state["optim"] = {
                n: {
                    "exp_avg": torch.empty(shape[n]),
                    "exp_avg_sq": torch.empty(shape[n]),
                    "step": torch.zeros(()),
                }
                for n, _ in part
            }
        read(state)
        for n, p in part:
            value = state["model"][n].to(self.ctx.device)
            safe_set_full_fp32_param(p, value)  # the fp32 master ...
            self._set_weight(p, value)  # ... and the weight the model computes with
            if with_optimizer:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(
                        p, state["optim"][n][key].to(self.ctx.device), key
                    )
        return float(state["optim"][part[0][0]]["step"]) if with_optimizer else None

    def _set_weight(self, p, value: torch.Tensor) -> None:
        # ZeRO-3: gather, write on one rank, scatter back to every partition
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.ctx.rank == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))

    def given_config(self) -> str:
        """The JSON DeepSpeed was given (written beside the run's config)."""
        return json.dumps(self.ds_config, sort_keys=True)
