"""Issue 35: bad input the CLI took silently or answered with a traceback; each is now one line naming the
value and the fix. Sweep plans, parallel.deepspeed, import-megatron rank files, a second Ctrl-C, binary
files, and out-of-range counts."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from megatron_sep.cli import MAX_NEW_TOKENS
from megatron_sep.config import dump_config
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from .test_data_safety import ROOT, assert_one_line_error, cli

BINARY = b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00"  # the start of an executable: NUL and non-UTF-8 bytes
MOCK = {
    "model": {
        "num_layers": 1,
        "hidden_size": 32,
        "num_heads": 4,
        "vocab_size": 64,
        "max_position_embeddings": 64,
    },
    "data": {"mock": True, "seq_len": 16},
    "train": {"micro_batch_size": 2, "global_batch_size": 2, "device": "cpu"},
}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """One trained step of a model wide enough that a full KV cache of a few million tokens fills a machine."""
    d = tmp_path_factory.mktemp("run")
    Trainer(
        tiny_config(
            corpus,
            d,
            model={"num_layers": 4, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 4},
            train={"steps": 1},
            checkpoint={"save_interval": 1},
        )
    ).run()
    return d


# ---- 1. sweep plans ---------------------------------------------------------------------------


def sweep(tmp_path, *args, **plan):
    path = tmp_path / "plan.yaml"
    path.write_text(
        yaml.safe_dump({"name": "p", "base": MOCK, "tokens": 1000, "runs": {"a": {}}, **plan})
    )
    # --report-only: a plan that loads stops at the missing sweep.json, before any training
    return cli("sweep", path, "--out", tmp_path / "sweep", "--report-only", *args)


@pytest.mark.parametrize(
    "case",
    ["reference list", "evals 0", "tokens 1e400", "binary base", "broken base", "binary plan"],
)
def test_sweep_plan_edge_cases(tmp_path, case):
    binary, broken = tmp_path / "binary.yaml", tmp_path / "broken.yaml"
    binary.write_bytes(BINARY)
    broken.write_text("model: {num_layers: [\n")
    proc, words = {
        "reference list": (
            lambda: sweep(tmp_path, reference=[34.8, 40.1]),
            [
                "plan.reference=[34.8, 40.1]: must be a mapping",
                "Fix: write e.g. reference: {metric:",
            ],
        ),
        "evals 0": (
            lambda: sweep(tmp_path, evals=0),
            ["plan.evals=0: must be a whole number >= 1", "Fix:"],
        ),
        "tokens 1e400": (
            lambda: sweep(tmp_path, "--tokens", "1e400"),
            ["--tokens='1e400': is beyond any training budget", "Fix:"],
        ),
        "binary base": (
            lambda: sweep(tmp_path, base=str(binary)),
            [
                f"plan.base='{binary}': is a binary file, not YAML",
                "Fix: give the path of a YAML config",
            ],
        ),
        "broken base": (
            lambda: sweep(tmp_path, base=str(broken)),
            [f"plan.base='{broken}': is not valid YAML (line 2"],
        ),
        "binary plan": (
            lambda: cli("sweep", binary, "--report-only"),
            [f"plan='{binary}': is a binary file"],
        ),
    }[case]
    assert_one_line_error(proc(), *words)


# ---- 2. parallel.deepspeed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"zero_optimization": 3}, "parallel.deepspeed.zero_optimization=3: must be a mapping"),
        (
            {"steps_per_print": "often"},
            "parallel.deepspeed.steps_per_print='often': must be a number",
        ),
        (
            {"flops_profiler": "on"},
            "parallel.deepspeed.flops_profiler='on': DeepSpeed cannot read it",
        ),
        (
            {"wall_clock_breakdwn": True},
            "is not a key DeepSpeed 0.19.8 reads (it would be ignored). Fix: did you "
            "mean 'wall_clock_breakdown'?",
        ),
    ],
)
def test_deepspeed_keys_are_checked_at_config_load(tmp_path, extra, words):
    deepspeed = pytest.importorskip("deepspeed")
    words = words.replace("0.19.8", deepspeed.__version__)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **MOCK,
                "parallel": {"engine": "deepspeed", "zero": 1, "deepspeed": extra},
                "train": {**MOCK["train"], "run_dir": str(tmp_path / "run")},
            }
        )
    )
    assert_one_line_error(cli("train", "-c", config, "--check-config"), words)


# ---- 3. import-megatron ------------------------------------------------------------------------


def test_megatron_rank_file_that_is_not_a_dict(tmp_path):
    rank = tmp_path / "ckpt" / "mp_rank_00" / "model_optim_rng.pt"
    rank.parent.mkdir(parents=True)
    for content, words in (
        ([1, 2], "it holds a list, not a mapping"),
        ({"model": ["w"], "args": None}, "its 'model' entry holds a list"),
    ):
        torch.save(content, rank)
        assert_one_line_error(
            cli("import-megatron", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out"),
            f"{rank} is not a Megatron checkpoint: {words}",
            "Fix: pass the model_optim_rng.pt",
        )


# ---- 4. a second Ctrl-C ------------------------------------------------------------------------


def _interrupted_twice(tmp_path, hook: str):
    """`train` run as its console script does (main() reading sys.argv), with `hook` run first; Ctrl-C once
    two steps are logged, and again once the hook has touched tmp_path/marker. -> (exit status, stderr)."""
    cfg = tiny_config(
        {"tokenizer": None, "prefix": None},
        tmp_path / "run",
        model={"vocab_size": 64},
        data={"mock": True, "tokenizer": None, "paths": []},
        train={"steps": 100000, "eval_interval": 100000},
        checkpoint={"save_interval": 100000},
    )
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    marker, metrics = tmp_path / "marker", tmp_path / "run" / "metrics.jsonl"
    code = (
        f"import sys, time, pathlib\nmarker = pathlib.Path({str(marker)!r})\n{hook}\n"
        "from megatron_sep.cli import main\nsys.exit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "train", "-c", str(tmp_path / "c.yaml")],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    for path, signals in ((metrics, 1), (marker, 0)):
        deadline = time.time() + 120
        while (
            not (path.exists() and len(path.read_text().splitlines()) >= signals * 2)
            and time.time() < deadline
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted") and "Fix:" in lines[-1], err
    return proc.returncode, lines[-1]


def test_second_ctrl_c_while_saving_is_one_line(tmp_path):
    """The trainer's save after the first Ctrl-C is slow here; the second stops it."""
    hook = (
        "from megatron_sep.training import Trainer\nsave = Trainer.save\n"
        "def slow(self, *a, **k):\n    marker.touch()\n    time.sleep(60)\n    return save(self, *a, **k)\n"
        "Trainer.save = slow\n"
    )
    rc, line = _interrupted_twice(tmp_path, hook)
    assert rc == 130 and "checkpoints are atomic: the last one written completely is intact" in line


def test_second_ctrl_c_while_exiting_is_one_line(tmp_path):
    """After the save, while the process exits (a slow atexit handler, as a process group's teardown)."""
    hook = "import atexit\natexit.register(lambda: (marker.touch(), time.sleep(60)))\n"
    rc, line = _interrupted_twice(tmp_path, hook)
    assert rc == 130 and "after the command had finished" in line


# ---- 5. binary files ---------------------------------------------------------------------------


def test_binary_config_and_eval_text_are_named(run, tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(BINARY)
    assert_one_line_error(
        cli("train", "-c", binary),
        f"--config='{binary}': is a binary file, not YAML text",
        "Fix: pass the path of a YAML config",
    )
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model:\x00 {}\n")  # valid UTF-8, yet no text file holds NUL
    assert_one_line_error(cli("train", "-c", nul), f"--config='{nul}': is a binary file")
    text = tmp_path / "text.jsonl"
    text.write_bytes(b'{"text": "fine"}\n' + BINARY)
    assert_one_line_error(
        cli("eval", "--load", run, "--out", tmp_path / "e", "--text", text, "--device", "cpu"),
        f"--text {text} is a binary file, not UTF-8 text",
        "Fix: pass a .txt file",
    )


# ---- 6. counts and --force ---------------------------------------------------------------------


def test_preprocess_workers_below_one(corpus, tmp_path):
    for workers in ("0", "-3"):
        assert_one_line_error(
            cli(
                "preprocess",
                "--input",
                corpus["jsonl"],
                "--tokenizer",
                corpus["tokenizer"],
                "--out",
                tmp_path / "out",
                "--workers",
                workers,
            ),
            f"--workers: must be >= 1, got {workers}",
        )
    assert not list(tmp_path.iterdir())


def test_generate_refuses_endless_lengths(run):
    assert_one_line_error(
        cli(
            "generate",
            "--load",
            run,
            "--prompt",
            "the",
            "--max-new-tokens",
            "100000000000",
            timeout=120,
        ),
        f"must be at most {MAX_NEW_TOKENS:,}, got 100000000000",
    )


def test_generate_refuses_a_full_cache_larger_than_memory(run):
    per_token = 2 * 4 * 256 * 4  # keys and values, 4 layers, 256 wide, fp32
    tokens = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_token + 1
    if tokens > MAX_NEW_TOKENS:
        pytest.skip(
            f"this machine holds a full cache of {MAX_NEW_TOKENS:,} tokens of the test model"
        )
    args = (
        "generate",
        "--load",
        run,
        "--prompt",
        "the",
        "--device",
        "cpu",
        "--max-new-tokens",
        tokens,
    )
    assert_one_line_error(
        cli(*args, timeout=120),
        "the full cache keeps every key",
        "Fix: fewer --max-new-tokens, or --cache sep or streaming",
    )
    assert_one_line_error(
        cli(*args, "--cache", "static", timeout=120), "the static cache keeps every key"
    )


def test_demo_corpus_force_refuses_a_directory(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert_one_line_error(
            cli("demo-corpus", "--out", out, *force, timeout=600),
            f"--out {out} is a directory; demo-corpus writes one .jsonl file",
            f"Fix: pass a file path, e.g. --out {out / 'corpus.jsonl'}",
        )
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
        and (out / "notes.txt").read_text() == "mine"
    )


def test_refused_commands_create_nothing(corpus, tmp_path):
    """A trial of the redesign found commands that refused but left their output folder behind: eval (its
    --out), preprocess and tokenizer train (the output's parent). And a tp that cannot divide the heads was
    reported only after the world size, and not by --check-config."""
    missing = tmp_path / "missing.jsonl"
    p = cli("eval", "--load", tmp_path / "nowhere", "--out", tmp_path / "ev")
    assert_one_line_error(p, "holds no checkpoint")
    p = cli(
        "preprocess",
        "--input",
        missing,
        "--tokenizer",
        corpus["tokenizer"],
        "--out",
        tmp_path / "pp" / "out",
    )
    assert_one_line_error(p, "not found")
    p = cli(
        "tokenizer",
        "train",
        "--input",
        missing,
        "--out",
        tmp_path / "tk" / "tok",
        "--vocab-size",
        300,
    )
    assert_one_line_error(p, "not found")
    assert sorted(x.name for x in tmp_path.iterdir()) == []
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(tiny_config(corpus, tmp_path / "run", parallel={"tp": 3})))
    for extra in ((), ("--check-config",)):
        p = cli("train", "-c", config, *extra)
        assert_one_line_error(p, "parallel.tp=3", "model.num_heads=4")
    assert not (tmp_path / "run").exists()
