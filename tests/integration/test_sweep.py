"""`megatron-sep sweep`: three tiny runs in parallel on CPU produce a full report; finished runs are
skipped, an interrupted one resumes from its checkpoint; bad plans fail before any training."""

import importlib.util
import json
import re

import matplotlib.image as mpimg
import pytest
import yaml

from megatron_sep import cli
from megatron_sep.config import ConfigError
from megatron_sep.experiments import sweep
from megatron_sep.experiments.commands import cmd_sweep
from megatron_sep.experiments.report import COLUMNS


def write_plan(corpus, path, **extra):
    base = {
        "model": {
            "family": "llama",
            "num_layers": 2,
            "hidden_size": 32,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 64,
        },
        "attention": {"init_tokens": 2, "stats_interval": 2},
        "data": {
            "tokenizer": str(corpus["tokenizer"]),
            "paths": [corpus["prefix"]],
            "seq_len": 32,
            "split": [0.9, 0.1, 0.0],
        },
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "eval_iters": 2, "device": "cpu"},
        "logging": {"log_interval": 1, "peak_tflops": 0.01},
    }  # a nominal peak, so MFU is filled on CPU
    plan = {
        "name": "tiny",
        "base": base,
        "tokens": 1536,
        "evals": 3,  # 6 steps of 8 x 32 tokens
        "runs": {
            "dense": {"attention.kind": "dense"},
            "sepllm_n8": {"attention.kind": "sepllm", "attention.window": 8},
            "streaming_n8": {"attention.kind": "streamingllm", "attention.window": 8},
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(plan))
    return path


def test_sweep_reports_resumes_and_skips(corpus, tmp_path, capsys):
    plan, out = write_plan(corpus, tmp_path / "plan.yaml"), tmp_path / "sweep"
    assert cli.main(["sweep", str(plan), "--out", str(out), "--only", "dense"]) == 0
    # an interrupted run: trained to step 3 of 6 and stopped, as a preemption would leave it
    from megatron_sep.training import Trainer

    cfg = sweep.resolve_runs(sweep.load_plan(plan), None, out, [], ["sepllm_n8"])["sepllm_n8"]
    Trainer(cfg).run(until=3)
    assert sweep.finished_step(cfg) == 3
    capsys.readouterr()

    assert cli.main(["sweep", str(plan), "--out", str(out), "--parallel", "2"]) == 0
    said = capsys.readouterr().out
    assert "[dense] finished at step 6: skipped" in said
    assert "[sepllm_n8] resuming from step 3 to step 6" in said
    assert "resumed from" in (out / "logs" / "sepllm_n8.log").read_text()

    report = (out / "report.md").read_text()
    table = report.split("\n\n")[1]  # the first table: one row per run
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| run")
    ]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(COLUMNS) and all(cells) and not any("nan" in c for c in cells), row
    data = json.loads((out / "report.json").read_text())["runs"]
    by = {r["run"]: r for r in data}
    assert by["dense"]["kept_pairs"] == 1.0 and by["dense"]["kept_kv"] == 1.0
    # the sparse runs attend fewer pairs, so attention is a smaller share of their FLOPs
    assert by["streaming_n8"]["kept_pairs"] < 1.0 and by["sepllm_n8"]["kept_pairs"] < 1.0
    assert by["sepllm_n8"]["attention_flops_share"] < by["dense"]["attention_flops_share"]
    assert all(r["tokens"] == 1536 and len(r["val"]) >= 3 for r in data)
    assert re.search(r"Ordering at this budget.*<.*<", report)
    whole = json.loads((out / "report.json").read_text())
    # Figure 1: every sparse run has its compute-to-dense-loss entry; copy-distance gaps are paired with dense
    assert whole["reference_run"] == "dense"
    assert set(whole["compute_to_reference_loss"]) == {"sepllm_n8", "streaming_n8"}
    assert all(
        c["gap_ci"][0] <= c["gap"] <= c["gap_ci"][1]
        for run in ("sepllm_n8", "streaming_n8")
        for c in whole["copy_distance_gaps"][run]
        if "gap" in c
    )
    assert all(r["curve"][-1]["flops"] > r["curve"][0]["flops"] > 0 for r in data)
    for png in (
        "val_loss_vs_tokens.png",
        "loss_by_position.png",
        "tokens_per_s.png",
        "val_loss_vs_flops_time.png",
        "loss_by_copy_distance.png",
    ):
        img = mpimg.imread(out / png)
        # a drawn figure, not blank
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
        assert f"]({png})" in report

    # --only trains the runs named, but the report still covers every finished run of the plan
    assert (
        cli.main(["sweep", str(plan), "--out", str(out), "--only", "dense", "--report-only"]) == 0
    )
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 3

    # a sweep folder copied without checkpoints (off a GPU machine) reports the same numbers, and trains nothing
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    assert cli.main(["sweep", str(plan), "--out", str(copy), "--report-only"]) == 0
    again = {r["run"]: r for r in json.loads((copy / "report.json").read_text())["runs"]}
    assert {n: r["final_val_loss"] for n, r in again.items()} == {
        n: r["final_val_loss"] for n, r in by.items()
    }
    assert again["sepllm_n8"]["copy_distance"] == by["sepllm_n8"]["copy_distance"]

    before = {n: (out / "runs" / n / "metrics.jsonl").read_text() for n in by}
    assert cli.main(["sweep", str(plan), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert all(f"[{n}] finished at step 6: skipped" in said for n in by)
    assert all((out / "runs" / n / "metrics.jsonl").read_text() == before[n] for n in by)


@pytest.mark.parametrize(
    "args, extra, match",
    [
        (["--only", "dense,nope"], {}, r"--only.*nope.*choose from dense, sepllm_n8, streaming_n8"),
        (
            ["--set", "attention.window=16"],
            {},
            r"--set.*conflicts with run 'sepllm_n8'.*attention.window=8",
        ),
        (["--tokens", "10B"], {}, r"--tokens.*more than the training split of run 'dense' holds"),
        ([], {"set": {"train.steps": 5}}, r"plan.set.train.steps.*set by the sweep.*--tokens"),
        (["--tokens", "lots"], {}, r"--tokens.*not a token count"),
        ([], {"runs": {"..": {}}}, r"plan.runs.*'\.\.'.*names a directory"),
        ([], {"name": "../elsewhere"}, r"plan.name.*names a directory"),
        (
            ["--set", "data.tokenizer=/nope/tok.model"],
            {},
            r"data.tokenizer.*/nope/tok.model.*not found",
        ),
        (["--set", "train.precision=fp8"], {}, r"train.precision.*float8 tensor cores"),
        (["--report-only"], {}, r"--report-only.*holds no sweep"),
    ],
)
def test_bad_plans_fail_before_training(corpus, tmp_path, args, extra, match):
    plan, out = write_plan(corpus, tmp_path / "plan.yaml", **extra), tmp_path / "sweep"
    with pytest.raises(ConfigError, match=match):
        cmd_sweep(cli.build_parser().parse_args(["sweep", str(plan), "--out", str(out), *args]))
    assert not out.exists()


def test_a_plan_that_is_not_yaml_is_one_line(tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text("runs: {dense: [\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_plan(bad)
    assert "\n" not in str(e.value) and "line 2" in str(e.value) and str(bad) in str(e.value)


def test_a_sweep_refuses_a_directory_it_did_not_make(corpus, tmp_path):
    plan, out = write_plan(corpus, tmp_path / "plan.yaml"), tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a sweep directory"):
        cmd_sweep(cli.build_parser().parse_args(["sweep", str(plan), "--out", str(out)]))
    assert (out / "notes.txt").read_text() == "keep me"


def test_lm_eval_task_files(corpus, tmp_path):
    from megatron_sep.experiments.lm_eval_task import write_task

    text = write_task(corpus["jsonl"], tmp_path / "tasks", docs=20).read_text()
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda lo, node: ("function", lo.construct_scalar(node)))
    task = yaml.load(text, loader)
    rows = [json.loads(x) for x in open(tmp_path / "tasks" / "heldout_lastword.jsonl")]
    assert len(rows) == 20 and task["task"] == "heldout_lastword"
    # portable: no path in the YAML; its loader finds the jsonl beside itself after a move (issue 39)
    assert str(tmp_path) not in text and "/" not in str(task.get("dataset_kwargs"))
    assert task["custom_dataset"] == ("function", "heldout_lastword_data.load")
    moved = tmp_path / "elsewhere"
    (tmp_path / "tasks").rename(moved)
    spec = importlib.util.spec_from_file_location("moved_task", moved / "heldout_lastword_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.data_file() == str(moved / "heldout_lastword.jsonl")
    moved.rename(tmp_path / "tasks")
    for r in rows:  # the target is the passage's last word, split off with its space
        assert re.fullmatch(r" \w[\w'-]{2,}", r["target"]) and not r["context"].endswith(" ")
    # a second build into the same directory needs --force, and replaces only the task's own files
    (tmp_path / "tasks" / "keep.txt").write_text("mine")
    args = [
        "lm-eval-task",
        "--input",
        str(corpus["jsonl"]),
        "--out",
        str(tmp_path / "tasks"),
        "--docs",
        "5",
    ]
    assert cli.main(args) == 2
    assert cli.main(args + ["--force"]) == 0
    assert (tmp_path / "tasks" / "keep.txt").read_text() == "mine"
    assert sum(1 for _ in open(tmp_path / "tasks" / "heldout_lastword.jsonl")) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text key"}\n')
    with pytest.raises(ConfigError, match="--input.*bad.jsonl:1.*'text'"):
        write_task(bad, tmp_path / "t2")


def test_parallel_sweep_shows_progress_and_marks_shared_speed(
    corpus, tmp_path, capsys, monkeypatch
):
    """--parallel: the runs write only to their logs, so the sweep echoes each one's newest step line as
    it trains (and its last one), and says, live and in the report, that their tokens/s shared the cores."""
    monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.0)
    runs = {"dense": {"attention.kind": "dense"}, "sepllm_n8": {"attention.window": 8}}
    plan, out = write_plan(corpus, tmp_path / "plan.yaml", runs=runs, evals=1), tmp_path / "sweep"
    args = ["sweep", str(plan), "--out", str(out), "--parallel", "2", "--tokens", "1024"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert f"2 runs at once: {sweep.SHARED_NOTE}" in said
    for name in runs:  # 4 steps of 8 x 32 tokens; the last step line comes before "done"
        steps = re.findall(rf"^\[{name}\] step +(\d)/4 \| loss .* \| elapsed", said, re.M)
        assert steps and steps[-1] == "4", said
        assert said.index(f"[{name}] step      4/4") < said.index(f"[{name}] done")
    report = (out / "report.md").read_text()
    assert f"**dense, sepllm_n8: {sweep.SHARED_NOTE}** (trained 2 at a time" in report
    # one run at a time: no note (its speed is its own)
    from megatron_sep.experiments.report import shared_note

    assert shared_note([{"run": "dense", "parallel": 1}, {"run": "x", "parallel": 1}]) == ""
