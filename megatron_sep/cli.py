"""`megatron-sep` command line: train, sweep, lm-eval-task, tokenizer, preprocess, inspect, demo-corpus,
offline-corpus, corpus-subset, export-hf, import-hf, import-neox, import-megatron, generate, eval."""

# (the docstring is the --help description.) Here: the flags, the dispatch, and the mapping of errors to one
# line and an exit status; each command's code lives with its domain (COMMANDS).
from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import signal
import sys

# command -> module:function taking the parsed flags and returning the exit status. A command's module is
# imported when it runs, so `--help` and a mistyped flag answer without importing torch.
COMMANDS = {
    "train": "megatron_sep.experiments.commands:cmd_train",
    "sweep": "megatron_sep.experiments.commands:cmd_sweep",
    "lm-eval-task": "megatron_sep.experiments.commands:cmd_lm_eval_task",
    "tokenizer": "data_tools.commands:cmd_tokenizer",
    "preprocess": "data_tools.commands:cmd_preprocess",
    "inspect": "data_tools.commands:cmd_inspect",
    "offline-corpus": "data_tools.commands:cmd_offline_corpus",
    "corpus-subset": "data_tools.commands:cmd_corpus_subset",
    "export-hf": "megatron_sep.convert.commands:cmd_export_hf",
    "import-hf": "megatron_sep.convert.commands:cmd_import_hf",
    "import-neox": "megatron_sep.convert.commands:cmd_import_neox",
    "import-megatron": "megatron_sep.convert.commands:cmd_import_megatron",
    "generate": "megatron_sep.inference.commands:cmd_generate",
    "eval": "megatron_sep.inference.commands:cmd_eval",
    "demo-corpus": "data_tools.commands:cmd_demo_corpus",
}


def command(name: str):
    """The function that runs command `name` (imports its module)."""
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def _add_config_args(p):
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set optim.lr=3e-4",
    )


def _cache_sizes(text):
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not four counts initial,separators,window,capacity (e.g. 4,64,256,512)"
        )
    return sizes


def _ints(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma list of integers (e.g. 16,48,128)"
        )
    return values


def _caches(text):
    kinds = [k for k in text.split(",") if k]
    bad = [k for k in kinds if k not in ("sep", "streaming", "full")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"{text!r}: caches are a comma list of sep, streaming and full"
        )
    return ",".join(kinds)


def _at_least(low, kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


MAX_NEW_TOKENS = (
    10_000_000  # 2.5 x the 4M-token streams of the SepLLM paper; more is days of decoding
)


def _token_count(text, low=0):
    """20000, 64K, 4M (decimal, as sweep --tokens) -> a count >= low."""
    from .config import ConfigError
    from .experiments.sweep import parse_tokens

    try:
        value = int(text) if text.strip().isdigit() else parse_tokens(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count (e.g. 20000, 64K or 4M)"
        ) from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
    return value


def _new_tokens(text):
    value = _at_least(1, int)(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_NEW_TOKENS:,}, got {text} (2.5 x the 4M-token "
            "streams of the SepLLM paper; more is days of decoding: split a longer "
            "generation into several calls)"
        )
    return value


def _probability(text):
    value = _at_least(0.0, float)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line, like every other error, instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}. Fix: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="megatron-sep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a GPT model (resumes from run_dir's latest checkpoint)")
    _add_config_args(p)
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate and print the resolved config, then exit",
    )

    p = sub.add_parser(
        "sweep", help="train a plan's runs at equal tokens, resumably, and write a report"
    )
    p.add_argument(
        "plan", help="sweep YAML (base config, overrides per run), e.g. configs/experiments/*.yaml"
    )
    p.add_argument(
        "--tokens", help="training tokens per run, e.g. 50M or 1.5B (default: the plan's)"
    )
    p.add_argument("--out", help="sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--only", help="comma list of run names to train and report")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value in every run (repeatable), e.g. --set data.paths=[...]",
    )
    p.add_argument("--parallel", type=_at_least(1, int), default=1, help="runs at once (CPU only)")
    p.add_argument(
        "--allow-repeat", action="store_true", help="allow a budget beyond one pass over the data"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report of the finished runs, train nothing",
    )

    p = sub.add_parser(
        "lm-eval-task", help="an offline LAMBADA-style lm-eval task from held-out documents"
    )
    p.add_argument("--input", required=True, help=".jsonl of held-out documents (not trained on)")
    p.add_argument(
        "--out",
        required=True,
        help="directory for NAME.jsonl and NAME.yaml (lm_eval --include_path)",
    )
    p.add_argument("--name", default="heldout_lastword")
    p.add_argument("--docs", type=_at_least(1, int), default=500, help="examples to keep")
    p.add_argument("--text-key", default="text")
    p.add_argument(
        "--force", action="store_true", help="replace the task files of an earlier run in --out"
    )

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece or HF BPE tokenizer")
    t.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    t.add_argument(
        "--out",
        required=True,
        help="output prefix: P.model + P.vocab, or P.json for hf-bpe (a folder: P/tokenizer.json)",
    )
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--type", choices=["bpe", "unigram", "hf-bpe"], default="bpe")
    t.add_argument("--text-key", default="text", help="jsonl field holding the text")
    t.add_argument("--no-byte-fallback", action="store_true")
    t.add_argument(
        "--no-split-separators",
        action="store_true",
        help="do not force . , ? ! ; : newline tab to be single tokens",
    )
    t.add_argument("--force", action="store_true", help="replace an existing tokenizer at --out")

    p = sub.add_parser("preprocess", help="tokenize a corpus into Megatron .bin/.idx")
    p.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--text-key", default="text")
    p.add_argument(
        "--workers",
        type=_at_least(1, int),
        default=None,
        help="tokenizer processes (default: all cores)",
    )
    p.add_argument(
        "--txt-docs",
        choices=["blank", "line", "file"],
        default="blank",
        help="plain text: one document per blank-line block, per line, or per file",
    )
    p.add_argument("--force", action="store_true", help="replace existing PREFIX.bin/.idx")

    p = sub.add_parser("inspect", help="summarise a .bin/.idx corpus")
    p.add_argument("prefix")
    p.add_argument("--tokenizer", help="to show token pieces and the separator share")
    p.add_argument("--top", type=int, default=20)

    p = sub.add_parser(
        "offline-corpus", help="build the >= 100M-token corpus of pinned PyPI and Debian packages"
    )
    p.add_argument(
        "--out", default="data/offline", help="the corpus folder (new, or one this command made)"
    )
    p.add_argument(
        "--manifest", help="pinned package list (default data_tools/offline_manifest.json)"
    )
    p.add_argument("--cache", help="where downloaded packages are kept (default OUT/downloads)")
    p.add_argument(
        "--force", action="store_true", help="rebuild a corpus of another manifest in --out"
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "corpus-subset", help="a seeded choice of whole documents of a .bin/.idx corpus"
    )
    p.add_argument("prefix")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--tokens", required=True, help="about this many tokens, e.g. 40M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")

    p = sub.add_parser(
        "export-hf", help="checkpoint (any parallel layout) -> Hugging Face directory"
    )
    p.add_argument("--load", required=True, help="run dir, checkpoints dir or step_* dir")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tokenizer", help="tokenizer to export (default: the run's data.tokenizer)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, replacing only the files an export writes",
    )

    p = sub.add_parser(
        "import-hf", help="local GPT-NeoX / Llama transformers directory -> project checkpoint"
    )
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--attention",
        choices=["dense", "sepllm", "streamingllm", "fixed_interval"],
        help="attention kind of the imported model (e.g. sepllm for SepLLM post-training)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out (never over its checkpoints)",
    )

    p = sub.add_parser(
        "import-neox", help="GPT-NeoX config (+ SepLLM's NeoX flags) and checkpoint -> ours"
    )
    p.add_argument("--config", required=True, help="the GPT-NeoX .yml")
    p.add_argument(
        "--checkpoint",
        help="its save folder (latest + global_step*/layer_*-model_*-model_states.pt)",
    )
    p.add_argument(
        "--out", required=True, help="folder for config.yaml (and checkpoints/ with --checkpoint)"
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs the NeoX run used: its global batch is micro x accumulation x dp (default: one "
        "data-parallel replica, tp x pp GPUs)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out (never over checkpoints)"
    )

    p = sub.add_parser(
        "import-megatron",
        help="Megatron-LM / Megatron-Core GPT checkpoint (torch_dist or "
        "mp_rank_* files, any tp / pp) -> project checkpoint",
    )
    p.add_argument(
        "--checkpoint", required=True, help="Megatron's --save folder, or one iter_* folder in it"
    )
    p.add_argument("--out", required=True, help="folder for config.yaml and checkpoints/")
    p.add_argument(
        "--config",
        help="a project config for the other sections (data, optim, train, ...), and the model's "
        "rotary_base, norm_eps, ... for a checkpoint without Megatron's args",
    )
    p.add_argument(
        "--num-heads",
        type=int,
        help="the attention head count, for a checkpoint without Megatron's args (its tensors "
        "give the rest of the shape)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out (never over checkpoints)"
    )

    p = sub.add_parser(
        "generate", help="generate text from a checkpoint (KV cache, SepLLM mask while decoding)"
    )
    p.add_argument("--load", required=True, help="run dir, checkpoints dir or step_* dir")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--max-new-tokens", type=_new_tokens, default=64, help=f"at most {MAX_NEW_TOKENS:,}"
    )
    p.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_at_least(0, int), default=0)
    p.add_argument("--top-p", type=_probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--evict",
        action="store_true",
        help="drop cached keys no later token can see (SepLLM's streaming memory saving)",
    )
    p.add_argument(
        "--cache",
        choices=["full", "sep", "streaming", "static"],
        default="full",
        help="full: every key the mask can reach; sep: SepCache, fixed capacity (bounded memory); "
        "streaming: StreamingLLM (initial tokens + window); static: every key, in buffers sized for "
        "prompt + new tokens (what --cuda-graphs replays)",
    )
    p.add_argument(
        "--cache-sizes",
        type=_cache_sizes,
        default=(4, 64, 256, 512),
        help="SepCache initial,separators,window,capacity (default 4,64,256,512 as in the paper)",
    )
    p.add_argument(
        "--cache-positions",
        choices=["original", "cache"],
        default="original",
        help="RoPE at stream positions, or at slots in the cache (StreamingLLM's shift)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=_at_least(0, int),
        default=0,
        help="feed the prompt this many tokens at a time (0: all at once)",
    )
    p.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each decode step as a CUDA graph (the "
        "static cache): small models decode many times faster at batch 1, where launches bind",
    )
    p.add_argument(
        "--draft",
        help="a draft model's run dir, checkpoints dir or step_* dir: speculative decoding "
        "(same output distribution as the target alone; greedy gives the same tokens)",
    )
    p.add_argument(
        "--draft-tokens",
        type=_at_least(1, int),
        help="tokens the draft proposes per round (default 4; fewer when fewer are still wanted)",
    )
    p.add_argument(
        "--draft-cache",
        choices=["full", "sep", "streaming", "static"],
        help="the draft's KV cache (default: --cache); sizes from --cache-sizes",
    )
    p.add_argument("--draft-tokenizer", help="override the draft checkpoint's data.tokenizer")

    p = sub.add_parser(
        "eval",
        help="perplexity, loss by position and streaming perplexity of a checkpoint, and "
        "with --probes the beyond-window probes",
    )
    p.add_argument(
        "--load", required=True, help="run dir, checkpoints dir or step_* dir (any layout)"
    )
    p.add_argument("--out", required=True, help="directory for eval.json and the PNG plots")
    p.add_argument("--force", action="store_true", help="replace an earlier eval's files in --out")
    src_group = p.add_mutually_exclusive_group()
    src_group.add_argument(
        "--data", help=".bin/.idx prefix (default: the run's own validation split)"
    )
    src_group.add_argument("--text", help=".txt or .jsonl file, tokenized with the run's tokenizer")
    p.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer (with --text)")
    p.add_argument(
        "--iters",
        type=_at_least(1, int),
        help="validation micro-batches (default: train.eval_iters)",
    )
    p.add_argument("--micro-batch", type=_at_least(1, int), help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=_at_least(2, int), help="default: data.seq_len")
    p.add_argument(
        "--buckets", type=_at_least(1, int), default=32, help="position buckets of the loss plot"
    )
    p.add_argument(
        "--stream-tokens",
        type=_token_count,
        default=0,
        help="also stream this many tokens (e.g. 20000, 64K, 4M) through each --cache and report "
        "perplexity per segment",
    )
    p.add_argument(
        "--cache", default="sep,streaming", type=_caches, help="comma list of sep, streaming, full"
    )
    p.add_argument(
        "--cache-sizes",
        type=_cache_sizes,
        default=(4, 64, 256, 512),
        help="initial,separators,window,capacity (default 4,64,256,512 as in the paper)",
    )
    p.add_argument("--cache-positions", choices=["original", "cache"], default="original")
    p.add_argument(
        "--chunk", type=_at_least(1, int), default=64, help="tokens fed per streaming step"
    )
    p.add_argument(
        "--segment",
        type=lambda text: _token_count(text, 1),
        default=65536,
        help="tokens per perplexity segment",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="stream the bounded caches eagerly (default on CUDA: each chunk replays one CUDA graph)",
    )
    p.add_argument(
        "--time-limit",
        type=_at_least(0, float),
        metavar="SECONDS",
        help="stop each cache's stream after this long and report the tokens reached (a full cache "
        "slows down as it grows; running out of device memory also stops a stream)",
    )
    p.add_argument(
        "--probes",
        action="store_true",
        help="also the beyond-window probes (docs/probes.md): loss by "
        "distance to a copyable earlier occurrence, and passkey retrieval",
    )
    p.add_argument(
        "--distance-edges",
        type=_ints,
        default=[0, 32, 64, 128, 256, 512, 1024],
        help="copy-distance bucket edges in tokens, from 0, increasing; the last bucket is open",
    )
    p.add_argument(
        "--passkey-distances",
        type=_ints,
        help="filler tokens between the pass key and the question; each prompt must fit data.seq_len "
        "(default: those of 16,48,128,512,1536 that fit, and the longest that fits)",
    )
    p.add_argument("--passkey-trials", type=_at_least(1, int), default=20, help="keys per distance")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo-corpus", help="build the demo corpus (no download needed)")
    p.add_argument("--out", default="data/demo/corpus.jsonl")
    p.add_argument("--force", action="store_true", help="replace an existing file at --out")
    return parser


OS_FIXES = {
    errno.ENOSPC: "free disk space (the last checkpoint is intact) and run again",
    errno.EDQUOT: "free disk quota and run again",
    errno.EFBIG: "the file system or a ulimit caps file sizes: raise the limit or write elsewhere",
    errno.EACCES: "choose a path you can write to, or fix its permissions",
    errno.EPERM: "choose a path you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "the path is a directory where a file is expected: choose another path",
    errno.EEXIST: "the path exists as a file where a directory is needed: choose another path",
}


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    if e.errno is None:  # raised by this project with its own message
        return str(e)
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}. Fix: {OS_FIXES.get(e.errno, 'check the path and try again')}"


# A Ctrl-C: what is on disk, per command (a second one while train saves lands here too)
INTERRUPTED = {
    "train": ": checkpoints are atomic: the last one written completely is intact and loadable, and a save cut "
    "short left no partial one. Fix: run the same command again to resume from that checkpoint",
    "sweep": ": finished runs are kept, and each interrupted run's last complete checkpoint is intact "
    "(checkpoints are atomic). Fix: run the same sweep again to resume",
}
EXITING = (
    "error: interrupted while exiting, after the command had finished: what it wrote is complete "
    "(checkpoints are atomic). Fix: nothing to redo; run the command again only to continue\n"
)


def _exit_now(signum, frame):
    """SIGINT once the command is over: the process ends at once, without a traceback from its exit path
    (thread joins, atexit handlers, a process group's teardown)."""
    try:
        sys.stdout.flush()
    except Exception:  # interrupted inside a write: the line in flight may be lost
        pass
    os.write(2, EXITING.encode())
    os._exit(130)


def main(argv=None) -> int:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        what = INTERRUPTED.get(words[0] if words else "", ". Fix: run the command again")
        print(f"error: interrupted (Ctrl-C){what}", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # this process's own command line: it exits next
            signal.signal(signal.SIGINT, _exit_now)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    errors = _one_line_errors()
    try:
        return command(args.command)(args)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _one_line_errors() -> tuple[type[Exception], ...]:
    """Errors whose message names the problem and its fix: printed as they are (imported after parsing, as
    they import torch)."""
    from .config import ConfigError
    from .convert.hf import ConversionError
    from .data.indexed import IndexedDataError
    from .data.tokenizer import TokenizerError
    from .checkpoint import CheckpointError
    from .training.run_lock import RunLockedError
    from .training.trainer import TrainingError

    return (
        ConfigError,
        IndexedDataError,
        TokenizerError,
        CheckpointError,
        ConversionError,
        ValueError,
        TrainingError,
        RunLockedError,
    )


if __name__ == "__main__":
    raise SystemExit(main())
