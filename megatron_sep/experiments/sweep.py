"""`megatron-sep sweep`: train a named set of configs at equal tokens on one corpus, then report.

A plan is a small YAML: a base config, overrides for every run, and per-run overrides (dotted keys).
The sweep owns each run's `train.steps` (from one token budget) and `train.run_dir` (SWEEP/runs/NAME).
Every run is a `megatron-sep train` process: one after another on a GPU, or several at once on CPU. A
finished run (its last checkpoint at train.steps) is skipped; an interrupted one resumes from its
checkpoint, as `train` does. SWEEP/sweep.json records the budget and each run's resolved config, so a
later invocation with other settings is refused instead of mixing two experiments in one report."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, config_from_dict, dump_config
from ..config.load import read_yaml
from ..checkpoint import list_checkpoints

MAX_TOKENS = 1e15  # a quadrillion: past any corpus, so above it a typo (or inf)
OWNED = ("train.steps", "train.run_dir")  # set by the sweep: equal tokens, one directory per run
PLAN_KEYS = ("name", "base", "tokens", "set", "runs", "reference", "evals")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # plan and run names become directory names
PROGRESS_EVERY = 30.0  # seconds between the progress lines of runs training at once
STEP_LINE = re.compile(r"step +\d+/\d+ \|")
SHARED_NOTE = "runs shared the machine: tokens/s not comparable across runs"


@dataclass
class Plan:
    name: str
    path: Path
    base: dict
    tokens: int | None
    common: dict  # overrides for every run
    runs: dict  # name -> overrides
    # e.g. the paper's numbers, shown next to the results
    reference: dict = field(default_factory=dict)
    evals: int = 10  # validation points per run when the plan does not set train.eval_interval


def parse_tokens(text) -> int:
    """100M, 1.5B, 2e6, 300000 -> tokens."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    try:
        value = (
            float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
        )
    except (AttributeError, ValueError):  # no match, or a number like 1.2.3
        raise ConfigError(
            "--tokens", text, "is not a token count", "write e.g. 50M, 1.5B or 2000000"
        ) from None
    if not math.isfinite(value) or value > MAX_TOKENS:
        raise ConfigError(
            "--tokens",
            text,
            f"is beyond any training budget (more than {MAX_TOKENS:.0e} tokens)",
            "write e.g. 50M or 1.5B",
        )
    if value < 1:
        raise ConfigError("--tokens", text, "must be at least 1 token", "write e.g. 50M")
    return int(value)


def _overrides(where: str, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            where, raw, "must be a mapping of section.key: value", "e.g. {attention.window: 64}"
        )
    for key in raw:
        if not isinstance(key, str) or len(key.split(".")) != 2:
            raise ConfigError(
                where, key, "an override key must be section.key", "write e.g. attention.window"
            )
        if key in OWNED:
            raise ConfigError(
                f"{where}.{key}",
                raw[key],
                "is set by the sweep (equal tokens, one directory per run)",
                "remove it; scale the runs with --tokens",
            )
    return dict(raw)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "plan", str(path), "file not found", "pass a sweep YAML, e.g. configs/experiments/"
        )
    raw = read_yaml(path, "plan", "pass a sweep YAML, e.g. configs/experiments/")
    if not isinstance(raw, dict):
        raise ConfigError(
            "plan", str(path), "must be a mapping", f"use the keys {', '.join(PLAN_KEYS)}"
        )
    unknown = [k for k in raw if k not in PLAN_KEYS]
    if unknown:
        raise ConfigError("plan", unknown, "unknown plan keys", f"use {', '.join(PLAN_KEYS)}")
    base = raw.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ConfigError(
                "plan.base",
                base,
                f"not found (looked at {base_path})",
                "give a config path relative to the plan file, or an inline mapping of sections",
            )
        base = (
            read_yaml(
                base_path, "plan.base", "give the path of a YAML config, relative to the plan file"
            )
            or {}
        )
    if not isinstance(base, dict):
        raise ConfigError(
            "plan.base", base, "must be a config path or a mapping of sections", "see configs/"
        )
    runs = raw.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("plan.runs", runs, "must name at least one run", "e.g. runs: {dense: {}}")
    for where, name in [("plan.name", raw.get("name") or path.stem)] + [
        ("plan.runs", n) for n in runs
    ]:
        if not NAME.fullmatch(str(name)):
            raise ConfigError(
                where,
                name,
                "names a directory",
                "use letters, digits, _ . - (first a letter or digit)",
            )
    evals = raw.get("evals", 10)
    # 0 would silently mean 10
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 1:
        raise ConfigError(
            "plan.evals",
            evals,
            "must be a whole number >= 1: the validation points per run that "
            "the report's loss curves are drawn from",
            "write e.g. evals: 10, or leave it out (10)",
        )
    return Plan(
        name=str(raw.get("name") or path.stem),
        path=path,
        base=base,
        tokens=parse_tokens(raw["tokens"]) if raw.get("tokens") is not None else None,
        common=_overrides("plan.set", raw.get("set")),
        runs={str(n): _overrides(f"plan.runs.{n}", o) for n, o in runs.items()},
        reference=_reference(raw.get("reference")),
        evals=evals,
    )


def _reference(raw) -> dict:
    """Published numbers shown beside the results: {metric: text, note: text, RUN: number, ...}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "plan.reference",
            raw,
            "must be a mapping of run name: number (with optional metric: and note: text)",
            "write e.g. reference: {metric: LAMBADA ppl, dense: 34.8}",
        )
    for key, value in raw.items():
        text = key in ("metric", "note")
        if isinstance(value, bool) or not isinstance(value, str if text else (int, float)):
            raise ConfigError(
                f"plan.reference.{key}",
                value,
                f"must be {'text' if text else 'a number'}",
                "write e.g. reference: {metric: LAMBADA ppl, dense: 34.8}",
            )
    return raw


def resolve_runs(
    plan: Plan,
    tokens: int | None,
    out: Path,
    cli_set: list[str],
    only: list[str] | None,
    allow_repeat: bool = False,
) -> dict[str, Config]:
    """Each run's validated config: base, then plan.set, then the run's own keys, then --set."""
    from ..config.load import parse_override, set_value

    tokens = tokens or plan.tokens
    if tokens is None:
        raise ConfigError(
            "--tokens",
            None,
            "no token budget given",
            "pass --tokens (e.g. 50M) or set tokens: in the plan",
        )
    names = list(plan.runs)
    if only:
        unknown = [n for n in only if n not in plan.runs]
        if unknown:
            raise ConfigError(
                "--only",
                unknown,
                f"not runs of plan {plan.name}",
                f"choose from {', '.join(names)}",
            )
        names = [n for n in names if n in only]
    cli = {}
    for text in cli_set:
        (section, key), value = parse_override(text)
        cli[f"{section}.{key}"] = value
    _overrides("--set", cli)
    configs = {}
    for name in names:
        clash = sorted(k for k in cli if k in plan.runs[name] and cli[k] != plan.runs[name][k])
        if clash:
            raise ConfigError(
                "--set",
                clash,
                f"conflicts with run {name!r}, which sets "
                f"{', '.join(f'{k}={plan.runs[name][k]!r}' for k in clash)}",
                "drop the --set, or leave that run out with --only",
            )
        raw = copy.deepcopy(plan.base)
        for key, value in {**plan.common, **plan.runs[name], **cli}.items():  # later ones win
            set_value(raw, *key.split("."), value)
        cfg = config_from_dict(raw)
        t = cfg.train
        per_step = t.samples_per_step * cfg.data.seq_len
        t.steps = max(1, math.ceil(tokens / per_step))
        t.run_dir = str(out / "runs" / name)
        chosen = {
            **plan.common,
            **plan.runs[name],
            **cli,
        }  # the base's cadence was meant for its own length
        if "train.eval_interval" not in chosen:
            t.eval_interval = max(1, t.steps // plan.evals)
        if "checkpoint.save_interval" not in chosen:
            # an interrupted run loses at most one eval's work
            cfg.checkpoint.save_interval = t.eval_interval
        configs[name] = cfg
    check_inputs(configs)
    if not allow_repeat:
        check_corpus(configs, tokens)
    return configs


def check_inputs(configs: dict[str, Config]) -> None:
    """What each run would find missing only after it started: the tokenizer, an fp8 GPU."""
    import torch

    from ..parallel import fp8

    for name, cfg in configs.items():
        tok = cfg.data.tokenizer
        if not cfg.data.mock and tok and not Path(tok).is_file():
            raise ConfigError(
                "data.tokenizer",
                tok,
                f"not found (run {name!r})",
                "point it at the tokenizer file, e.g. --set data.tokenizer=PATH",
            )
        if cfg.train.precision == "fp8":
            cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
            fp8.check_device(torch.device("cuda" if cuda else "cpu"))


def check_corpus(configs: dict[str, Config], tokens: int) -> None:
    """A budget beyond one pass over the training split would repeat data: refuse before any training."""
    from ..data.dataset import split_ranges
    from ..data.indexed import IndexedDataset

    sizes = {}  # the runs of a plan usually share one corpus: read each index once
    for name, cfg in configs.items():
        d = cfg.data
        if d.mock:
            continue
        key = (tuple(d.paths), tuple(d.split))
        if key not in sizes:
            sizes[key] = 0
            for p in d.paths:
                ix = IndexedDataset(p)
                lo, hi = split_ranges(ix.num_docs, d.split)[0]
                sizes[key] += int(ix.doc_sizes[lo:hi].sum())
        have = sizes[key]
        if tokens > have:
            raise ConfigError(
                "--tokens",
                f"{tokens:,}",
                f"is more than the training split of run {name!r} holds "
                f"({have:,} tokens of {', '.join(d.paths)})",
                "lower --tokens, add data, or pass --allow-repeat to train on it more than once",
            )


def finished_step(cfg: Config) -> int:
    done = list_checkpoints(Path(cfg.train.run_dir) / "checkpoints")
    return int(done[-1].split("_")[1]) if done else 0


def finished(cfg: Config, record: dict | None) -> bool:
    """Trained to the end: its last checkpoint says so, or, in a sweep folder copied without checkpoints (off a
    GPU machine), sweep.json says done and the run's metrics and cached evaluation are there."""
    if finished_step(cfg) >= cfg.train.steps:
        return True
    run = Path(cfg.train.run_dir)
    return (
        bool(record)
        and record.get("status") == "done"
        and (run / "metrics.jsonl").is_file()
        and (run / "sweep_eval.json").is_file()
    )


class State:
    """SWEEP/sweep.json: the budget, each run's resolved config and wall time."""

    def __init__(self, out: Path, plan: Plan, tokens: int, configs: dict[str, Config]):
        self.path = out / "sweep.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        old = self.data.get("runs", {})
        if self.data and self.data.get("tokens") != tokens:
            raise ConfigError(
                "--tokens",
                tokens,
                f"{out} holds a sweep with a budget of {self.data.get('tokens'):,} tokens",
                "use that budget, or a new --out for a new experiment",
            )
        for (
            name,
            cfg,
        ) in configs.items():  # a run that never saved a step may take a corrected config
            text = dump_config(cfg)
            if name in old and old[name]["config"] != text:
                if finished_step(cfg) > 0:
                    raise ConfigError(
                        "--out",
                        str(out),
                        f"holds run {name!r} trained with another config",
                        "use the same plan and --set, or a new --out",
                    )
                old[name]["config"] = text
        self.data.update({"plan": str(plan.path), "name": plan.name, "tokens": tokens})
        self.data.setdefault("runs", {})
        for name, cfg in configs.items():
            self.data["runs"].setdefault(
                name, {"config": dump_config(cfg), "wall_s": 0.0, "status": "pending"}
            )
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def update(self, name: str, **values) -> None:
        self.data["runs"][name].update(values)
        self.save()


def execute(
    configs: dict[str, Config], out: Path, state: State, parallel: int, echo=print
) -> list[str]:
    """Train every unfinished run; returns the names that failed."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    todo = []
    for name, cfg in configs.items():
        step = finished_step(cfg)
        if finished(cfg, state.data["runs"].get(name)):
            echo(f"[{name}] finished at step {max(step, cfg.train.steps)}: skipped")
            state.update(name, status="done")
            continue
        path = out / "configs" / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        todo.append((name, path, step))
    env = dict(os.environ)
    if parallel > 1:  # share the cores instead of each process taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    running, failed = {}, []
    if parallel > 1 and len(todo) > 1:
        echo(f"{min(parallel, len(todo))} runs at once: {SHARED_NOTE}")  # and the report says so
    try:
        _loop(configs, out, state, parallel, echo, todo, running, failed, env)
    # the runs got the signal too: they save a checkpoint and exit; wait for that
    except KeyboardInterrupt:
        for name, (proc, log, t0) in running.items():
            proc.wait()
            log.close()
            state.update(
                name,
                status="interrupted",
                wall_s=state.data["runs"][name]["wall_s"] + time.perf_counter() - t0,
            )
        raise
    return failed


def latest_step_line(log: Path) -> str | None:
    """The last step line a run's log holds (its tail is enough: a step line comes every few lines)."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
        tail = f.read().decode(errors="replace").splitlines()
    return next((line for line in reversed(tail) if STEP_LINE.match(line)), None)


def _progress(out: Path, running: dict, shown: dict, echo) -> None:
    """Runs writing only to their logs (--parallel): each one's newest step line, when it is new."""
    for name in running:
        line = latest_step_line(out / "logs" / f"{name}.log")
        if line and line != shown.get(name):
            shown[name] = line
            echo(f"[{name}] {line}")


def _loop(configs, out, state, parallel, echo, todo, running, failed, env) -> None:
    shown, last_progress = {}, time.perf_counter()
    while todo or running:
        while todo and len(running) < parallel:
            name, path, step = todo.pop(0)
            log = open(out / "logs" / f"{name}.log", "a")
            cmd = [sys.executable, "-m", "megatron_sep", "train", "--config", str(path)]
            echo(
                f"[{name}] {'resuming from step ' + str(step) if step else 'training'} to step "
                f"{configs[name].train.steps}; log: {out / 'logs' / (name + '.log')}"
            )
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE if parallel == 1 else log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
            running[name] = (proc, log, time.perf_counter())
            state.update(name, status="running", parallel=len(running))
            for (
                other
            ) in running:  # the report's note: which runs shared the machine, and with how many
                if state.data["runs"][other]["parallel"] < len(running):
                    state.update(other, parallel=len(running))
            if parallel == 1:  # one run at a time: show its log lines as they come
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    echo(f"[{name}] {line.rstrip()}")
        for name, (proc, log, t0) in list(running.items()):
            rc = proc.wait() if parallel == 1 else proc.poll()
            if rc is None:
                continue
            log.close()
            del running[name]
            wall = state.data["runs"][name]["wall_s"] + time.perf_counter() - t0
            ok = rc == 0 and finished_step(configs[name]) >= configs[name].train.steps
            state.update(name, status="done" if ok else f"failed (exit {rc})", wall_s=wall)
            if parallel > 1:  # its last step line, which the periodic progress may not have shown
                _progress(out, [name], shown, echo)
            echo(f"[{name}] {'done' if ok else f'FAILED (exit {rc})'} in {wall / 60:.1f} min")
            if not ok:
                failed.append(name)
        if running and parallel > 1 and time.perf_counter() - last_progress >= PROGRESS_EVERY:
            _progress(out, running, shown, echo)
            last_progress = time.perf_counter()
        if running:
            time.sleep(0.5)
