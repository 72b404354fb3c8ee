"""DeepSpeed's side of the config: the JSON generated from ours (`ds_config`), an expert's parallel.deepspeed
keys checked at config load against the installed DeepSpeed's own parser (`check_expert_keys`), and the
import with a one-line error naming the install. The engine itself is engine/deepspeed.py."""

from __future__ import annotations

import copy
import functools
import json

from ..errors import ConfigError, closest, first_line

INSTALL = "pip install -e '.[deepspeed]' (or pip install deepspeed)"
FIX_KEY = (
    "fix or remove the key in parallel.deepspeed (DeepSpeed's configuration reference lists them)"
)


def import_deepspeed():
    """DeepSpeed, or a config error naming the install command."""
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            "parallel.engine",
            "deepspeed",
            f"needs DeepSpeed, which cannot be imported ({e})",
            f"{INSTALL}, or set parallel.engine: native",
        ) from None
    return deepspeed


def _config_problem(e: Exception, key: str | None = None) -> Exception:
    """DeepSpeed's validation of its JSON (pydantic) as one config error naming the key (under `key`, the
    parallel.deepspeed section being checked, when given); other errors as they are."""
    errors = getattr(e, "errors", None)
    if type(e).__name__ != "ValidationError" or not callable(errors):
        return e
    first = errors()[0]
    loc = [str(x) for x in first.get("loc", ())]
    section = {"DeepSpeedZeroConfig": "zero_optimization"}.get(getattr(e, "title", ""), key)
    if section and loc[:1] != [section]:
        loc.insert(0, section)
    return ConfigError(
        "parallel.deepspeed." + ".".join(loc),
        first.get("input"),
        f"DeepSpeed rejects it: {first.get('msg')}",
        FIX_KEY,
    )


# Top-level keys DeepSpeed reads outside its config parser (deepspeed.initialize's mesh, a lazy property)
READ_ELSEWHERE = ("sequence_parallel_size", "data_parallel_size", "vocabulary_size")


@functools.cache
def deepspeed_keys() -> frozenset | None:
    """The top-level keys the installed DeepSpeed reads, recorded while its config parser reads a probe
    mapping: DeepSpeed silently ignores any other key, so a misspelt one would be lost. None if unknown."""
    seen = set()

    class Probe(dict):
        def __getitem__(self, k):
            seen.add(k)
            return dict.__getitem__(self, k)

        def get(self, k, default=None):
            seen.add(k)
            return dict.get(self, k, default)

        def __contains__(self, k):
            seen.add(k)
            return dict.__contains__(self, k)

        def keys(self):  # `KEY in d.keys()` is a lookup too
            return self

    try:
        _parse(Probe({"": None}))  # not empty: some sections are read only from a non-empty config
    # a DeepSpeed whose parser reads otherwise: no allow-list, DeepSpeed's own checks only
    except Exception:
        return None
    return frozenset(k for k in seen if isinstance(k, str) and k) | frozenset(READ_ELSEWHERE)


def _parse(param_dict: dict) -> None:
    """DeepSpeed's own reading of a config mapping (the batch-size checks need the world: left out)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = object.__new__(DeepSpeedConfig)
    parsed.global_rank, parsed.world_size = 0, 1
    parsed._initialize_params(param_dict)


def check_expert_keys(cfg) -> None:
    """parallel.deepspeed at config load: each key one DeepSpeed reads, each value of the type our generated
    JSON gives it and that DeepSpeed's parser accepts, so a mistake is one line naming the key, not a
    traceback inside DeepSpeed after the processes started, or a key DeepSpeed ignores."""
    try:
        deepspeed = import_deepspeed()
    except ConfigError:
        return  # the engine names the install command when it starts
    extra, known = cfg.parallel.deepspeed, deepspeed_keys()
    base = ds_config(cfg, 1, False, extra={})
    try:
        _parse(base)
    # this DeepSpeed's parser does not run on its own: its checks come at start-up
    except Exception:
        return
    for key, value in extra.items():
        where = f"parallel.deepspeed.{key}"
        if known is not None and key not in known:
            raise ConfigError(
                where,
                value,
                f"is not a key DeepSpeed {deepspeed.__version__} reads (it would be ignored)",
                closest(str(key), known),
            )
        _same_type(where, value, base.get(key))
        try:
            _parse(merge(base, {key: value}))
        except Exception as e:
            problem = _config_problem(e, key)
            if problem is e:  # not pydantic's validation: DeepSpeed's parser failed on this value
                problem = ConfigError(
                    where,
                    value,
                    f"DeepSpeed cannot read it ({type(e).__name__}: {first_line(e)})",
                    FIX_KEY,
                )
            raise problem from None


def _same_type(where: str, value, ours) -> None:
    """value where the generated JSON has `ours`: a mapping for a mapping (key by key), a boolean for a
    boolean, a number for a number."""
    if isinstance(ours, dict):
        if not isinstance(value, dict):
            raise ConfigError(
                where,
                value,
                "must be a mapping (a DeepSpeed config section)",
                "write it as {key: value, ...}, or remove it",
            )
        for k, v in value.items():
            _same_type(f"{where}.{k}", v, ours.get(k))
    elif ours is not None and (
        isinstance(ours, bool) != isinstance(value, bool) or not isinstance(value, (int, float))
    ):
        kind = "true or false" if isinstance(ours, bool) else "a number"
        raise ConfigError(
            where, value, f"must be {kind}", f"write {kind}, e.g. {json.dumps(ours)}, or remove it"
        )


def merge(base: dict, extra: dict) -> dict:
    """base with extra's keys over it, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = (
            merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def ds_config(cfg, dp: int, bf16: bool, extra: dict | None = None) -> dict:
    """DeepSpeed's JSON for this run: batch sizes, ZeRO stage, offload, clipping and precision from our
    config, with `extra` (default parallel.deepspeed) merged over it."""
    p, t = cfg.parallel, cfg.train
    global_batch = t.samples_per_step
    zero = {"stage": p.zero, "reduce_bucket_size": int(p.bucket_mb * 2**20 / 4)}
    if p.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": global_batch // (t.micro_batch_size * dp),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the optimizer the native engine uses
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # our step line reports progress
    }
    return merge(out, p.deepspeed if extra is None else extra)
