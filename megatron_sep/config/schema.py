"""The one config object: typed dataclasses, one per section.

Each field's type is checked at load; `check()` methods hold the range and
consistency rules. A rule violation raises ConfigError naming key, value, fix.
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


from ..errors import ConfigError  # noqa: F401 (re-exported)
from .dlcm_config import DLCMConfig
from .model_config import AttentionConfig, BlockParts, ModelConfig, _require  # noqa: F401 (re-exported)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = (
        1  # context parallel: the sequence split over cp ranks, heads swapped in around attention
    )
    dp: Union[int, Literal["auto"]] = "auto"  # auto: world / (tp * pp * cp)
    sequence_parallel: bool = False
    schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    # native: this project's data parallelism (ZeRO-1 at most); deepspeed: DeepSpeed wraps model and optimizer;
    # fsdp2: PyTorch's fully_shard over dp (x cp): weights, gradients and optimizer state sharded
    engine: Literal["native", "deepspeed", "fsdp2"] = "native"
    # 1: shard fp32 master weights and Adam states over data-parallel ranks; 2: also gradients; 3: also the
    # weights (2 and 3 with engine: deepspeed)
    zero: int = 0
    offload: Literal["none", "optimizer", "optimizer+params"] = (
        "none"  # to CPU memory (engine: deepspeed)
    )
    deepspeed: Optional[dict] = (
        None  # keys merged over the DeepSpeed config generated from this one (experts)
    )
    bucket_mb: float = 25.0  # gradient all-reduce bucket size

    def check(self) -> None:
        p = "parallel."
        for k in ("tp", "pp", "cp", "virtual_stages"):
            v = getattr(self, k)
            _require(v >= 1, p + k, v, "must be >= 1", "use a positive integer")
        _require(
            self.dp == "auto" or self.dp >= 1, p + "dp", self.dp, "must be >= 1 or auto", "use auto"
        )
        _require(
            self.zero in (0, 1, 2, 3),
            p + "zero",
            self.zero,
            "must be 0, 1, 2 or 3",
            "use 1 to shard optimizer state (2 and 3 need parallel.engine: deepspeed)",
        )
        _require(self.bucket_mb > 0, p + "bucket_mb", self.bucket_mb, "must be > 0", "use e.g. 25")
        _require(
            self.schedule == "interleaved" or self.virtual_stages == 1,
            p + "virtual_stages",
            self.virtual_stages,
            "needs schedule: interleaved",
            "set parallel.schedule=interleaved",
        )


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None  # a sentencepiece .model or an HF tokenizer.json
    paths: list[str] = field(default_factory=list)  # .bin/.idx prefixes
    weights: Optional[list[float]] = None  # blending weights, one per path
    split: list[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    seq_len: int = 256
    seed: int = 1234
    mock: bool = (
        False  # random tokens, no corpus or tokenizer (throughput runs); needs model.vocab_size
    )
    prefetch: int = 1  # steps whose micro-batches a thread reads ahead (0: read in the step)

    def check(self) -> None:
        p = "data."
        _require(self.seq_len >= 2, p + "seq_len", self.seq_len, "must be >= 2", "use e.g. 2048")
        _require(
            0 <= self.prefetch <= 4,
            p + "prefetch",
            self.prefetch,
            "must be 0 (off) to 4 steps ahead",
            "use 1 (one step's reading hides behind one step's compute), or 0 to turn it off",
        )
        _require(
            len(self.split) == 3
            and all(0 <= s < math.inf for s in self.split)
            and sum(self.split) > 0,
            p + "split",
            self.split,
            "must be three finite, non-negative fractions [train, valid, test]",
            "use e.g. [0.98, 0.01, 0.01]",
        )
        _require(
            self.split[0] > 0,
            p + "split",
            self.split,
            "the train fraction is 0",
            "give the train split a positive share",
        )
        if self.weights is not None:
            _require(
                len(self.weights) == len(self.paths),
                p + "weights",
                self.weights,
                f"has {len(self.weights)} entries for {len(self.paths)} data.paths",
                "give one weight per path, or null for weights proportional to size",
            )
            _require(
                all(0 <= w < math.inf for w in self.weights) and sum(self.weights) > 0,
                p + "weights",
                self.weights,
                "must be finite, non-negative, with a positive sum",
                "use e.g. [0.7, 0.3]",
            )


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: Optional[int] = None
    warmup_fraction: float = 0.01  # used when warmup_steps is null
    wsd_decay_fraction: float = 0.2  # share of steps spent decaying in `wsd`
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    skip_nonfinite: int = (
        0  # steps with a NaN/inf loss or grad norm whose update is dropped before the run stops
    )

    def check(self) -> None:
        p = "optim."
        _require(self.lr > 0, p + "lr", self.lr, "must be > 0", "use e.g. 6e-4")
        _require(
            0 <= self.min_lr <= self.lr,
            p + "min_lr",
            self.min_lr,
            f"must be in [0, optim.lr={self.lr}]",
            "use e.g. lr / 10",
        )
        _require(
            self.warmup_steps is None or self.warmup_steps >= 0,
            p + "warmup_steps",
            self.warmup_steps,
            "must be >= 0",
            "use a step count or null for warmup_fraction",
        )
        for k in ("warmup_fraction", "wsd_decay_fraction"):
            v = getattr(self, k)
            _require(0 <= v <= 1, p + k, v, "must be in [0, 1]", "use e.g. 0.01")
        for k in ("beta1", "beta2"):
            v = getattr(self, k)
            _require(0 <= v < 1, p + k, v, "must be in [0, 1)", "use e.g. 0.9 / 0.95")
        _require(
            self.weight_decay >= 0,
            p + "weight_decay",
            self.weight_decay,
            "must be >= 0",
            "use e.g. 0.1",
        )
        _require(self.eps > 0, p + "eps", self.eps, "must be > 0", "use e.g. 1e-8")
        _require(
            self.clip_grad >= 0,
            p + "clip_grad",
            self.clip_grad,
            "must be >= 0",
            "use 1.0, or 0 to disable",
        )
        _require(
            self.skip_nonfinite >= 0,
            p + "skip_nonfinite",
            self.skip_nonfinite,
            "must be >= 0",
            "use 0 (stop at the first non-finite step) or a small count",
        )


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None  # None: micro_batch_size (no accumulation)
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU; fp8: bf16 autocast with the blocks' linear layers in float8
    # (torchao), on GPUs with float8 tensor cores
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    compile: bool = False  # torch.compile each transformer block
    # recompute in backward: a whole block (full) or only its core attention (selective), as in Megatron
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # knowledge distillation (training/distill.py): a trained model (run, checkpoints or step_* dir) of the same
    # tokenizer whose logits the loss follows, e.g. the target of a speculative-decoding draft. distill_weight
    # is the KL term's share of the loss (the rest is cross-entropy on the data); validation stays cross-entropy
    distill_from: Optional[str] = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0

    def check(self) -> None:
        p = "train."
        for k in ("steps", "micro_batch_size", "eval_interval", "eval_iters"):
            v = getattr(self, k)
            _require(v >= 1, p + k, v, "must be >= 1", "use a positive integer")
        if self.global_batch_size is not None:
            gb, mb = self.global_batch_size, self.micro_batch_size
            _require(
                gb >= mb and gb % mb == 0,
                p + "global_batch_size",
                gb,
                f"is not a multiple of train.micro_batch_size={mb}",
                "use a multiple of micro_batch_size (x data-parallel size)",
            )
        _require(
            bool(self.run_dir),
            p + "run_dir",
            self.run_dir,
            "is empty",
            "name a directory for the run",
        )
        _require(
            0 < self.distill_weight <= 1,
            p + "distill_weight",
            self.distill_weight,
            "must be in (0, 1]",
            "use 1 for distillation alone, or e.g. 0.5 to mix it with cross-entropy",
        )
        _require(
            self.distill_temperature > 0,
            p + "distill_temperature",
            self.distill_temperature,
            "must be > 0",
            "use 1 (the teacher's own distribution) or a softer 2",
        )
        _require(
            self.distill_from is None or bool(str(self.distill_from).strip()),
            p + "distill_from",
            self.distill_from,
            "is empty",
            "name the teacher's run dir, or leave it null",
        )

    @property
    def samples_per_step(self) -> int:
        """The global batch: global_batch_size, or one micro-batch when it is unset."""
        return self.global_batch_size or self.micro_batch_size

    @property
    def accumulation(self) -> int:
        return self.samples_per_step // self.micro_batch_size


@dataclass
class CheckpointConfig:
    save_interval: int = 100
    keep_last: int = 2
    # steps also saved and never rotated out (a checkpoint history, as Pythia's extra_save_iters); 0 is the
    # initial weights
    extra_save_steps: list[int] = field(default_factory=list)
    load: Optional[str] = None  # initialise from this checkpoint dir when run_dir has none
    resume: bool = True  # continue from run_dir's `latest` when it exists
    # copy the state to host memory and write it in a background thread (DCP's async_save); `latest` moves
    # only once the write is complete and fsynced. The final save of a run is always synchronous.
    async_save: bool = False

    def check(self) -> None:
        _require(
            self.save_interval >= 1,
            "checkpoint.save_interval",
            self.save_interval,
            "must be >= 1",
            "use a positive step count",
        )
        _require(
            self.keep_last >= 1,
            "checkpoint.keep_last",
            self.keep_last,
            "must be >= 1",
            "keep at least one checkpoint",
        )
        bad = [s for s in self.extra_save_steps if s < 0]
        _require(
            not bad,
            "checkpoint.extra_save_steps",
            bad,
            "must be steps >= 0",
            "list the steps to keep, e.g. [0, 1000, 2000]",
        )


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "megatron-sep"
    wandb_mode: Literal["offline", "online"] = "offline"
    peak_tflops: Optional[float] = None  # None: known GPUs by name; MFU is not shown otherwise

    def check(self) -> None:
        _require(
            self.log_interval >= 1,
            "logging.log_interval",
            self.log_interval,
            "must be >= 1",
            "use a positive step count",
        )
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "logging.peak_tflops",
            self.peak_tflops,
            "must be > 0",
            "use the device's dense bf16 peak, e.g. 989 for an H100",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dlcm: DLCMConfig = field(default_factory=DLCMConfig)

    @property
    def wants_separators(self) -> bool:
        """Separator ids are resolved from the tokenizer: for SepLLM attention, or DLCM's separator boundaries."""
        dlcm_seps = self.model.arch == "dlcm" and self.dlcm.boundary == "separator"
        return self.attention.kind == "sepllm" or dlcm_seps

    def check(self) -> None:
        for name in SECTIONS:
            getattr(self, name).check()
        m, d, a = self.model, self.data, self.attention
        if isinstance(a.window, list):
            _require(
                len(a.window) == m.num_layers,
                "attention.window",
                a.window,
                f"has {len(a.window)} entries for model.num_layers={m.num_layers}",
                "give one window per layer, or a single integer",
            )
        _require(
            d.seq_len <= m.max_position_embeddings,
            "data.seq_len",
            d.seq_len,
            f"exceeds model.max_position_embeddings={m.max_position_embeddings}",
            "lower data.seq_len or raise model.max_position_embeddings",
        )
        self._check_context_parallel()
        self._check_engine()
        if m.arch == "dlcm":
            self._check_dlcm()
        else:
            changed = [
                f.name
                for f in dataclasses.fields(DLCMConfig)
                if getattr(self.dlcm, f.name) != getattr(DLCMConfig(), f.name)
            ]
            _require(
                not changed,
                "dlcm." + (changed[0] if changed else ""),
                getattr(self.dlcm, changed[0]) if changed else None,
                f"is set but model.arch is {m.arch!r}, so the dlcm section is not used",
                "set model.arch: dlcm, or remove the dlcm keys",
            )
        # the teacher runs whole on every rank, next to an unsharded head
        if self.train.distill_from:
            for key in ("tp", "pp", "cp"):
                value = getattr(self.parallel, key)
                _require(
                    value == 1,
                    "parallel." + key,
                    value,
                    "is not served with train.distill_from: the "
                    "teacher runs whole on every rank and the loss needs the student's whole logits",
                    f"distill with data parallelism only ({key}: 1), or drop train.distill_from",
                )
            _require(
                self.parallel.engine == "native",
                "parallel.engine",
                self.parallel.engine,
                "is not served with train.distill_from",
                "use parallel.engine: native to distill",
            )
        if m.subsampled:  # SUBLLM's levels select tokens over the whole sequence of one rank
            p = self.parallel
            _require(
                p.cp == 1,
                "parallel.cp",
                p.cp,
                "does not serve a subsampling model.structure yet: the "
                "scorer's top-k needs the whole sequence on one rank",
                "use tp (+ sequence_parallel), pp and data parallelism with SUBLLM, or model.structure: null",
            )
        if a.kind != "dense":  # what a backend cannot serve stops here, not mid-run
            _require(
                m.attention_dropout == 0,
                "model.attention_dropout",
                m.attention_dropout,
                f"is not supported by attention.kind={a.kind}",
                "set it to 0",
            )
            _require(
                a.backend != "triton" or m.head_dim in (16, 32, 64, 128),
                "attention.backend",
                a.backend,
                f"supports head dims 16, 32, 64 and 128, not {m.head_dim}",
                "use backend flex or auto",
            )
            if self.train.device == "cpu":
                check_backend_device(a.backend, "cpu")

    def _check_context_parallel(self) -> None:
        """Ulysses trades sequence slices for head slices: each cp rank needs an equal slice of the sequence,
        whole query heads, and whole kv heads or an equal share of replicated ones."""
        p, m, seq = self.parallel, self.model, self.data.seq_len
        cp, tp = p.cp, p.tp
        if cp == 1:
            return
        _require(
            seq % cp == 0,
            "parallel.cp",
            cp,
            f"does not divide data.seq_len={seq}",
            "use a cp that divides the sequence length (powers of two usually do)",
        )
        _require(
            not (p.sequence_parallel and tp > 1) or seq % (tp * cp) == 0,
            "parallel.cp",
            cp,
            f"x tp={tp} does not divide data.seq_len={seq}, as sequence parallelism needs",
            "use a sequence length divisible by tp * cp",
        )
        if m.num_heads % tp or m.kv_heads % tp:
            return  # the tp rule names that one (parallel.context.resolve_layout)
        heads, kv = m.num_heads // tp, m.kv_heads // tp
        _require(
            heads % cp == 0,
            "parallel.cp",
            cp,
            f"does not divide the {heads} query heads per tp rank "
            f"(model.num_heads={m.num_heads} / tp={tp})",
            "use tp x cp that divides model.num_heads",
        )
        _require(
            kv % cp == 0 or cp % kv == 0,
            "parallel.cp",
            cp,
            f"neither divides nor is a multiple of the {kv} kv heads per tp rank "
            f"(model.num_kv_heads={m.kv_heads} / tp={tp})",
            "use a cp that divides the kv heads per tp rank or is a multiple of them (then they are replicated)",
        )

    def _check_dlcm(self) -> None:
        """What DLCM serves: its stacks split model.num_layers, and the layouts built for it so far."""
        m, d, p = self.model, self.dlcm, self.parallel
        _require(
            1 <= d.encoder_layers < m.num_layers,
            "dlcm.encoder_layers",
            d.encoder_layers,
            f"must leave at least one of model.num_layers={m.num_layers} token layers to the decoder",
            f"use 1 to {m.num_layers - 1}, or raise model.num_layers (encoder + decoder layers)",
        )
        _require(
            m.structure is None,
            "model.structure",
            m.structure,
            "is SUBLLM's, not served with model.arch: dlcm",
            "set model.structure: null",
        )
        reasons = {
            "pp": "the backbone's concept sequence sits between the token stacks",
            "cp": "segments and their pooling need the whole sequence on one rank",
        }
        for key, why in reasons.items():
            value = getattr(p, key)
            _require(
                value == 1,
                "parallel." + key,
                value,
                f"is not served with model.arch: dlcm yet ({why})",
                f"use tp and data parallelism with DLCM ({key}: 1)",
            )
        _require(
            not (p.sequence_parallel and p.tp > 1),
            "parallel.sequence_parallel",
            p.sequence_parallel,
            "is not served with model.arch: dlcm yet (the router and pooling need the whole sequence)",
            "set parallel.sequence_parallel: false",
        )
        for key in ("concept_heads", "kv_heads"):
            heads = getattr(d, key)
            _require(
                heads % p.tp == 0,
                "parallel.tp",
                p.tp,
                f"does not divide the backbone's {heads} {key.replace('_', ' ')}",
                "use a tp that divides dlcm.concept_heads and dlcm.concept_kv_heads",
            )

    def _check_fsdp2(self) -> None:
        p = self.parallel
        rules = (
            (
                "zero",
                p.zero,
                p.zero == 0,
                "FSDP2 shards weights, gradients and Adam state itself",
                "set parallel.zero: 0 with parallel.engine: fsdp2",
            ),
            (
                "offload",
                p.offload,
                p.offload != "optimizer",
                "FSDP2 offloads weights, gradients and optimizer state together",
                "use offload: optimizer+params (FSDP2's CPU offload) or none",
            ),
            (
                "pp",
                p.pp,
                p.pp == 1,
                "is not served by parallel.engine=fsdp2 yet (our pipeline "
                "schedules run their own backward passes between stages)",
                "use parallel.engine: native with pp > 1",
            ),
            (
                "sequence_parallel",
                p.sequence_parallel,
                not (p.sequence_parallel and p.tp > 1),
                "is not served by parallel.engine=fsdp2 yet (norm gradients summed over tp)",
                "set parallel.sequence_parallel: false with fsdp2",
            ),
            (
                "deepspeed",
                p.deepspeed,
                p.deepspeed is None,
                "is DeepSpeed's, set with engine fsdp2",
                "remove parallel.deepspeed",
            ),
        )
        for key, value, ok, problem, fix in rules:
            _require(ok, "parallel." + key, value, problem, fix)

    def _check_engine(self) -> None:
        """What each engine serves, before any process starts (engine/deepspeed.py says why for DeepSpeed)."""
        p, e = self.parallel, self.parallel.engine
        if e == "native":
            _require(
                p.zero <= 1,
                "parallel.zero",
                p.zero,
                "ZeRO-2 and ZeRO-3 come from DeepSpeed",
                "set parallel.engine: deepspeed (pip install -e '.[deepspeed]'), or use zero 0 or 1",
            )
            _require(
                p.offload == "none",
                "parallel.offload",
                p.offload,
                "offload to CPU comes from DeepSpeed",
                "set parallel.engine: deepspeed, or offload: none",
            )
            _require(
                p.deepspeed is None,
                "parallel.deepspeed",
                p.deepspeed,
                "is set but parallel.engine is native",
                "set parallel.engine: deepspeed, or remove parallel.deepspeed",
            )
            return
        if e == "fsdp2":
            self._check_fsdp2()
            return
        for key, why in (
            ("tp", "its gradient partitioning and norm do not see our tensor-parallel shards"),
            ("pp", "our pipeline schedules run their own backward passes between stages"),
            ("cp", "its gradient reduction does not span the context-parallel ranks"),
        ):
            value = getattr(p, key)
            _require(
                value == 1,
                "parallel." + key,
                value,
                f"is not served by parallel.engine=deepspeed: {why}",
                f"use parallel.engine: native for {key} > 1 (ZeRO-1 there), or {key}: 1 with DeepSpeed",
            )
        for path, ours in DEEPSPEED_OWNED.items():  # generated from our keys: one place to set each
            head, _, tail = path.partition(".")
            given = (p.deepspeed or {}).get(head)
            if given is not None and (not tail or (isinstance(given, dict) and tail in given)):
                _require(
                    False,
                    "parallel.deepspeed." + path,
                    given if not tail else given[tail],
                    f"is generated from {ours}",
                    f"set {ours} instead, and remove it from parallel.deepspeed",
                )
        _require(
            p.zero >= 1,
            "parallel.zero",
            p.zero,
            "DeepSpeed without ZeRO is plain data parallelism",
            "use zero 1, 2 or 3 with DeepSpeed, or parallel.engine: native",
        )
        _require(
            p.offload != "optimizer+params" or p.zero == 3,
            "parallel.offload",
            p.offload,
            f"offloading the weights needs ZeRO-3, not zero={p.zero}",
            "set parallel.zero: 3, or offload: optimizer",
        )
        _require(
            self.train.precision != "fp8",
            "train.precision",
            "fp8",
            "is not served by parallel.engine=deepspeed (torchao's float8 layers and ZeRO's flat buffers)",
            "use bf16 with DeepSpeed, or the native engine for fp8",
        )
        if p.deepspeed:  # imports DeepSpeed: only when an expert gives keys
            from .deepspeed import check_expert_keys

            check_expert_keys(self)


# DeepSpeed keys that config/deepspeed.py generates from ours, or that the project's own loop replaces
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_clipping": "optim.clip_grad",
    "bf16": "train.precision",
    "bfloat16": "train.precision (DeepSpeed's other name for bf16)",
    "fp16": "train.precision (bf16 or fp32; fp16 loss scaling is not offered)",
    "optimizer": "optim.* (the project builds the AdamW)",
    "scheduler": "optim.schedule",
    "zero_optimization.stage": "parallel.zero",
    "zero_optimization.offload_optimizer": "parallel.offload",
    "zero_optimization.offload_param": "parallel.offload",
}


def check_backend_device(backend: str, device_type: str) -> None:
    """flex and triton run on CUDA (triton also under TRITON_INTERPRET=1, which the tests use)."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    _require(
        backend not in ("triton", "flex") or device_type == "cuda" or interpreted,
        "attention.backend",
        backend,
        f"needs a CUDA device, and this run is on {device_type}",
        "use backend reference or auto",
    )


SECTIONS = (
    "model",
    "attention",
    "parallel",
    "data",
    "optim",
    "train",
    "checkpoint",
    "logging",
    "dlcm",
)
