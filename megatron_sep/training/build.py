"""The build step: from the user's config to everything a run trains with (tokenizer, data, model, engine,
teacher, the resolved config), without changing the config it was given."""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Config, ConfigError, dump_config
from ..config.schema import check_backend_device
from ..data.dataset import check_token_range, run_datasets
from ..data.indexed import paths as data_files
from ..data.separators import resolve_separator_ids
from ..data.tokenizer import load_tokenizer
from ..engine import Engine, build_engine
from ..model import build_model
from ..parallel import ParallelContext, fp8, init_parallel
from ..parallel.parallelize import compile_blocks, parallelize
from .distill import Teacher
from .metrics import matmul_params, peak_flops


@dataclass
class Run:
    cfg: Config  # resolved: absolute paths, vocabulary, separator ids, eod id, kernels
    config_text: str  # the resolved config as saved with every checkpoint
    ctx: ParallelContext
    tokenizer: object | None  # None with data.mock
    train_ds: object
    valid_ds: object
    engine: Engine
    teacher: Teacher | None
    matmul_params: int  # of the whole model, before sharding (for MFU)
    num_params: int
    static_levels: bool  # SUBLLM's top-k: one static graph per level length (evaluation runs eager)
    peak: float | None  # FLOP/s per device, None: no MFU
    peak_source: str
    notes: list[str] = field(default_factory=list)  # for the run's log

    @property
    def model(self):
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.ctx.device


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", want, "no CUDA device is visible", "use auto or cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(user_cfg: Config) -> Run:
    cfg = copy.deepcopy(user_cfg)
    absolute_paths(cfg)  # the saved config then works from any directory (export-hf, generate)
    if cfg.parallel.engine == "deepspeed":  # missing: one line naming the install, before any work
        from ..config.deepspeed import import_deepspeed

        import_deepspeed()
    ctx = init_parallel(cfg, pick_device(cfg))
    if cfg.attention.kind != "dense":  # train.device auto: known only now, still before any work
        check_backend_device(cfg.attention.backend, ctx.device.type)
    if cfg.train.precision == "fp8":
        fp8.check_device(ctx.device)
        fp8.check_shapes(cfg)
        fp8.torchao_float8()
        # inductor fuses its norms with the fp8 casts
        if cfg.train.compile and cfg.model.kernels == "auto":
            cfg.model.kernels = "reference"
    seed_everything(cfg.train.seed)  # the same on every rank: each takes its slice of one model

    tokenizer = None if cfg.data.mock else load_checked_tokenizer(cfg)
    if cfg.data.mock and cfg.model.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            None,
            "is needed with data.mock (there is no tokenizer)",
            "set model.vocab_size, e.g. 32000",
        )
    train_ds, valid_ds = run_datasets(cfg)
    if not cfg.data.mock:
        check_token_range(cfg.data.paths, cfg.model.vocab_size)
    notes = resolve_attention(cfg, tokenizer)
    if valid_ds is None:
        raise ConfigError(
            "data.split",
            cfg.data.split,
            "the validation split holds no documents",
            "give the valid share (second entry) a positive value, e.g. [0.98, 0.01, 0.01]",
        )

    model = build_model(cfg)
    # the whole model, before sharding
    n_matmul, n_params = matmul_params(model), model.num_params()
    part = parallelize(model, cfg, ctx)
    notes += part.notes
    engine = build_engine(part, cfg, ctx)
    given = engine.given_config()
    if given is not None:
        notes.append(
            "deepspeed config (generated from this config; parallel.deepspeed overrides keys): "
            + given
        )
    static_levels = cfg.model.subsampled and not cfg.model.subsample_causal
    if cfg.train.compile:
        compile_blocks(part.blocks, static_shapes=static_levels)
    teacher = Teacher(cfg, tokenizer, ctx.device) if cfg.train.distill_from else None
    if teacher is not None:
        teacher.install(engine.model)
        notes.append(teacher.describe())
        if cfg.train.compile:
            teacher.compile()
    peak, source = peak_flops(cfg, ctx.device)
    return Run(
        cfg,
        dump_config(cfg),
        ctx,
        tokenizer,
        train_ds,
        valid_ds,
        engine,
        teacher,
        n_matmul,
        n_params,
        static_levels,
        peak,
        source,
        notes,
    )


def load_checked_tokenizer(cfg: Config):
    """The tokenizer, and model.vocab_size from it when unset (in the resolved config). Its checks (the data
    files exist) are also `train --check-config`'s."""
    m = cfg.model
    if not cfg.data.tokenizer:
        raise ConfigError(
            "data.tokenizer",
            None,
            "no tokenizer given",
            "set data.tokenizer to a sentencepiece .model or tokenizer.json (or data.mock)",
        )
    if not cfg.data.paths:
        raise ConfigError(
            "data.paths",
            [],
            "no training data given",
            "list .bin/.idx prefixes made by `megatron-sep preprocess` (or data.mock)",
        )
    if not os.path.exists(cfg.data.tokenizer):
        raise ConfigError(
            "data.tokenizer",
            cfg.data.tokenizer,
            "does not exist",
            "correct the path, or train one with `megatron-sep tokenizer train`",
        )
    for i, prefix in enumerate(cfg.data.paths):
        missing = [str(f) for f in data_files(prefix) if not f.is_file()]
        if missing:
            raise ConfigError(
                f"data.paths[{i}]",
                prefix,
                f"{' and '.join(missing)} not found",
                "correct the prefix (without .bin/.idx), or make the pair with `megatron-sep "
                "preprocess`",
            )
    tok = load_tokenizer(cfg.data.tokenizer)
    if m.vocab_size is None:
        m.vocab_size = tok.vocab_size
    elif m.vocab_size < tok.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            m.vocab_size,
            f"is smaller than the tokenizer's {tok.vocab_size} tokens",
            "raise it or leave it null",
        )
    return tok


def resolve_attention(cfg: Config, tok) -> list[str]:
    """Separator strings become ids and eod_id comes from the tokenizer (in the resolved config)."""
    a, notes = cfg.attention, []
    if tok is None:  # data.mock: ids only
        strings = [x for x in a.separators if isinstance(x, str)] if cfg.wants_separators else []
        if strings:
            raise ConfigError(
                "attention.separators",
                strings,
                "are strings, and data.mock has no tokenizer to resolve them",
                "list token ids instead, e.g. [13, 15, 30]",
            )
        if a.reset_per_document and a.eod_id is None:
            raise ConfigError(
                "attention.eod_id",
                None,
                "is needed for reset_per_document with data.mock",
                "set attention.eod_id",
            )
    if cfg.wants_separators:
        strings = [x for x in a.separators if isinstance(x, str)]
        ids, warnings = resolve_separator_ids(tok, strings) if strings else ([], [])
        ids += [x for x in a.separators if isinstance(x, int) and x not in ids]
        notes += [f"warning: {w}" for w in warnings]
        bad = [i for i in ids if not 0 <= i < cfg.model.vocab_size]
        if bad or not ids:
            raise ConfigError(
                "attention.separators",
                a.separators,
                f"resolve to no usable token ids (out of range: {bad})",
                "list strings the tokenizer has as single tokens, or valid ids",
            )
        a.separators = sorted(ids)
        shown = ", ".join(
            f"{i} {tok.id_to_piece(i)!r}" if tok else str(i) for i in a.separators[:32]
        )
        more = f", ... ({len(a.separators)} ids)" if len(a.separators) > 32 else ""
        notes.append(f"separator ids: {shown}{more}")
    if a.reset_per_document and a.eod_id is None:
        a.eod_id = tok.eod_id
    return notes


def absolute_paths(cfg: Config) -> None:
    d, c = cfg.data, cfg.checkpoint
    if d.tokenizer:
        d.tokenizer = os.path.abspath(d.tokenizer)
    d.paths = [os.path.abspath(p) for p in d.paths]
    if c.load:
        c.load = os.path.abspath(c.load)
    if cfg.train.distill_from:
        cfg.train.distill_from = os.path.abspath(cfg.train.distill_from)
