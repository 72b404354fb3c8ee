"""`megatron-sep train`, `sweep` and `lm-eval-task`: one run, a plan of runs and its report, and the offline
lm-eval task (cli.py parses the flags and maps errors to one line)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from ..config import ConfigError, dump_config, load_config
from ..parallel import resolve_layout
from ..training import Trainer
from ..training.build import load_checked_tokenizer
from . import sweep
from .lm_eval_task import write_task


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.check_config:
        # the layout rules that need no processes: on the smallest world that could run it
        p = cfg.parallel
        resolve_layout(cfg, p.tp * p.pp * p.cp * (1 if p.dp == "auto" else p.dp))
        if not cfg.data.mock:  # the run's own checks: the tokenizer and data files exist
            load_checked_tokenizer(copy.deepcopy(cfg))
        print(dump_config(cfg))
        return 0
    result = Trainer(cfg).run()
    if result.get("stopped_by"):
        print(f"stopped by {result['stopped_by']} at step {result['step']}; run again to resume")
    return 0


def cmd_sweep(args) -> int:
    from . import report  # matplotlib: loaded for a sweep only, not for train

    plan = sweep.load_plan(args.plan)
    tokens = sweep.parse_tokens(args.tokens) if args.tokens else None
    out = Path(args.out or f"runs/sweeps/{plan.name}")
    if out.is_file() or (
        out.is_dir() and any(out.iterdir()) and not (out / "sweep.json").is_file()
    ):
        raise ConfigError(
            "--out",
            str(out),
            "exists and is not a sweep directory (no sweep.json)",
            "choose a new --out; the sweep writes only into its own directory",
        )
    if args.report_only and not (out / "sweep.json").is_file():
        raise ConfigError(
            "--report-only",
            str(out),
            "holds no sweep (no sweep.json)",
            "run the sweep first, or point --out at a sweep directory",
        )
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    configs = sweep.resolve_runs(
        plan, tokens, out, args.overrides, only, args.allow_repeat or args.report_only
    )  # a report reads no corpus
    tokens = tokens or plan.tokens
    gpu = torch.cuda.is_available() and any(c.train.device != "cpu" for c in configs.values())
    if args.parallel > 1 and gpu:
        raise ConfigError(
            "--parallel",
            args.parallel,
            "would train several runs on one GPU at once",
            "use --parallel 1 on a GPU (runs go one after another), or --set train.device=cpu",
        )
    state = sweep.State(out, plan, tokens, configs)
    print(
        f"sweep {plan.name}: {len(configs)} run{'s' if len(configs) > 1 else ''} at {tokens:,} tokens each -> {out}"
    )
    failed = [] if args.report_only else sweep.execute(configs, out, state, args.parallel)
    every = configs
    if only:  # the report covers every finished run of the plan, not only the ones trained now
        try:
            every = sweep.resolve_runs(plan, tokens, out, args.overrides, None, allow_repeat=True)
        except ConfigError:  # another run conflicts with this --set: report the chosen ones
            pass
    done = [n for n, c in every.items() if sweep.finished(c, state.data["runs"].get(n))]
    if not done and args.report_only:
        raise ConfigError(
            "--report-only",
            str(out),
            "no run of this sweep has finished",
            "run the sweep without --report-only",
        )
    if done:
        device = torch.device("cuda" if gpu else "cpu")
        known = state.data["runs"]
        rows = [report.collect(n, every[n], known.get(n, {}), device) for n in done]
        path = report.write_report(
            out, plan.name, tokens, rows, plan.reference, [n for n in every if n not in done]
        )
        print(
            f"report: {path} (table, val_loss_vs_tokens.png, loss_by_position.png, tokens_per_s.png)"
        )
    if failed:
        logs = ", ".join(str(out / "logs" / f"{n}.log") for n in failed)
        print(
            f"error: {len(failed)} run{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}; see {logs}. "
            "Fix what the log shows and run the sweep again: finished runs are kept, failed ones resume "
            "from their last checkpoint",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_lm_eval_task(args) -> int:
    out = Path(args.out)
    path = write_task(args.input, out, args.name, args.docs, args.text_key, force=args.force)
    n = sum(1 for _ in open(out / f"{args.name}.jsonl"))
    print(
        f"wrote {path} ({n} examples). Run: lm_eval --model hf --model_args pretrained=HF_DIR,"
        f"trust_remote_code=True --include_path {out} --tasks {args.name}"
    )
    return 0
