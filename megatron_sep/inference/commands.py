"""`megatron-sep generate` and `megatron-sep eval`: a checkpoint's decoding and evaluation, with the checks
of their flags (cli.py parses them and maps errors to one line)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..outdir import check_out, prepare_out
from ..data.dataset import run_datasets
from ..data.tokenizer import TokenizerError, load_tokenizer, same_vocabulary
from . import evaluate as ev
from .generate import generate
from .options import DecodeOptions
from .probes import Probes, summary_lines
from .speculative import NO_PREFILL_CHUNK, speculative_generate


def _tokenizer(path: str, flag: str):
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise ValueError(
            f"the tokenizer {path} cannot be loaded ({str(e).split('. Fix:')[0]}). Fix: pass the one "
            f"the model was trained with: {flag} PATH"
        ) from None


def _device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def decode_options(args, eod_id: int | None) -> DecodeOptions:
    """The decoding record of generate's flags (temperature 0: greedy)."""
    return DecodeOptions(
        greedy=args.temperature == 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eod_id=eod_id,
        cache=args.cache,
        cache_sizes=args.cache_sizes,
        positions=args.cache_positions,
        evict=args.evict,
        cuda_graphs=args.cuda_graphs,
        prefill_chunk=args.prefill_chunk,
        draft_tokens=args.draft_tokens or 4,
        draft_cache=args.draft_cache,
    )


def cmd_generate(args) -> int:
    given = [
        flag
        for flag, value in (
            ("--draft-tokens", args.draft_tokens),
            ("--draft-cache", args.draft_cache),
            ("--draft-tokenizer", args.draft_tokenizer),
        )
        if value is not None
    ]
    if args.draft is None and given:
        raise ValueError(
            f"{', '.join(given)} set without --draft. Fix: add --draft DRAFT_RUN, or drop them"
        )
    if args.draft is not None and not args.draft.strip():
        raise ValueError(
            "--draft is empty. Fix: pass the draft's run dir, checkpoints dir or step_* dir"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda, but this torch sees no CUDA device. Fix: use --device cpu (or auto)"
        )
    device = _device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, cfg = load_model(args.load)
    model.to(device, dtype)
    tok = _tokenizer(args.tokenizer or cfg.data.tokenizer, "--tokenizer")
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError(
            "the prompt is empty (it encodes to no tokens). Fix: pass some text with --prompt"
        )
    opts = decode_options(args, tok.eod_id)
    new = args.max_new_tokens
    check_kv_memory(cfg, len(ids) + new, new, opts, device, dtype)
    limit = cfg.model.max_position_embeddings
    if len(ids) + new > limit:
        print(
            f"warning: {len(ids)} prompt + {new} new tokens pass the {limit} positions the model "
            "was trained with; later tokens may degrade",
            file=sys.stderr,
        )
    prompt = torch.tensor([ids], device=device)
    if args.draft:
        return _speculative(args, model, tok, prompt, opts, device, dtype)
    out = generate(model, prompt, new, opts)
    print(tok.decode(out[0, prompt.shape[1] :].tolist()))
    return 0


def _speculative(args, model, tok, prompt, opts: DecodeOptions, device, dtype) -> int:
    """`generate --draft`: the draft must read the target's token ids."""
    if opts.prefill_chunk:
        raise ValueError(NO_PREFILL_CHUNK)
    draft, draft_cfg = load_model(args.draft)
    draft.to(device, dtype)
    if prompt.shape[1] + args.max_new_tokens > draft_cfg.model.max_position_embeddings:
        print(
            f"warning: {prompt.shape[1]} prompt + {args.max_new_tokens} new tokens pass the draft's "
            f"{draft_cfg.model.max_position_embeddings} positions; its proposals may degrade (the output "
            "stays the target's)",
            file=sys.stderr,
        )
    draft_tok = _tokenizer(args.draft_tokenizer or draft_cfg.data.tokenizer, "--draft-tokenizer")
    if not same_vocabulary(tok, draft_tok):
        raise ValueError(
            f"the draft's tokenizer ({draft_tok.path}, {draft_tok.vocab_size} tokens) is not the "
            f"target's ({tok.path}, {tok.vocab_size} tokens): speculative decoding compares token "
            "ids. Fix: train the draft with the target's tokenizer (data.tokenizer)"
        )
    out, stats = speculative_generate(model, draft, prompt, args.max_new_tokens, opts)
    print(tok.decode(out[0, prompt.shape[1] :].tolist()))
    k = opts.draft_tokens
    print(
        f"speculative decoding, up to {k} draft token{'s' if k > 1 else ''} per round: {stats.line()}",
        file=sys.stderr,
    )
    return 0


def check_kv_memory(cfg, tokens: int, new_tokens: int, opts: DecodeOptions, device, dtype) -> None:
    """A cache that keeps every key grows with each token: refuse a length whose keys and values alone
    outgrow the device, instead of running until the process is killed."""
    if opts.cache in ("sep", "streaming") or (opts.evict and cfg.attention.kind != "dense"):
        return  # bounded, or keys dropped as a sparse mask lets go of them (--evict)
    m = cfg.model
    need = tokens * 2 * m.num_layers * m.kv_heads * m.head_dim * dtype.itemsize
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        have, where = (
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "of memory in this machine",
        )
    if need > have:
        raise ValueError(
            f"--max-new-tokens {new_tokens:,}: the {opts.cache} cache keeps every key, "
            f"{need / 2**30:,.1f} GiB of keys and values for {tokens:,} tokens, more than the "
            f"{have / 2**30:,.1f} GiB {where}. Fix: fewer --max-new-tokens, or --cache sep or "
            "streaming (bounded memory)"
        )


def cmd_eval(args) -> int:
    what = "replace only the files eval writes"
    check_out(Path(args.out), args.force, what)  # refused early; made once every check passed
    model, cfg = load_model(args.load)
    kinds = [k for k in args.cache.split(",") if k != "full"]
    if cfg.model.arch == "dlcm" and args.stream_tokens and kinds:  # before any work, not after it
        raise ValueError(
            f"a DLCM model streams with the full cache only, not {', '.join(kinds)} (its concepts grow "
            "with the stream). Fix: --cache full"
        )
    device = _device(args.device)
    model.to(device)
    seq = args.seq_len or cfg.data.seq_len
    if seq > cfg.model.max_position_embeddings:
        raise ValueError(
            f"--seq-len {seq} exceeds the model's max_position_embeddings "
            f"{cfg.model.max_position_embeddings}. Fix: a shorter --seq-len"
        )
    iters, mb = args.iters or cfg.train.eval_iters, args.micro_batch or cfg.train.micro_batch_size
    tokens = None
    if args.text:
        tokens, source = (
            ev.text_tokens(Path(args.text), load_tokenizer(args.tokenizer or cfg.data.tokenizer)),
            args.text,
        )
    elif args.data:
        tokens, source = (
            ev.corpus_tokens(args.data, max(iters * mb * seq + 1, args.stream_tokens + 1)),
            args.data,
        )
    if tokens is None and cfg.data.mock and args.stream_tokens:
        raise ValueError(
            "this run trained on data.mock: there is no corpus to stream. Fix: pass --data or --text"
        )
    ds = run_datasets(cfg)[1] if tokens is None else ev.Rows(tokens, seq)
    source = source if tokens is not None else "the run's validation split (data.paths, data.split)"
    if len(ds) < iters * mb:
        raise ValueError(
            f"{source} holds {len(ds)} samples of {seq + 1} tokens; --iters {iters} x --micro-batch {mb}"
            " are asked. Fix: lower --iters, --micro-batch or --seq-len, or give more data"
        )
    if args.probes:  # bad probe settings fail here, before any evaluation
        if not (args.tokenizer or cfg.data.tokenizer):
            raise ValueError(
                "--probes needs the run's tokenizer for the passkey, and this run has none "
                "(data.mock). Fix: pass --tokenizer PATH"
            )
        tok = _tokenizer(args.tokenizer or cfg.data.tokenizer, "--tokenizer")
        probes = Probes(cfg, tok, args.distance_edges, args.passkey_distances, args.passkey_trials)
    stream = _stream_tokens(args, cfg, tokens, source)  # too short: said before any evaluation
    result = {
        "checkpoint": str(args.load),
        "source": source,
        "seq_len": seq,
        "iters": iters,
        "micro_batch": mb,
        "device": str(device),
        "attention": cfg.attention.kind,
    }
    result["val_loss"] = ev.validation_loss(model, ds, iters, mb, device)
    result["val_ppl"] = math.exp(result["val_loss"])
    print(
        f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} ({iters} x {mb} samples "
        f"of {seq} tokens from {source})"
    )
    result["loss_by_position"] = ev.loss_by_position(model, ds, iters, mb, device, args.buckets)
    if args.probes:
        result["probes"] = probes.run(model, ds, iters, mb, device, filler=tokens)
        for line in summary_lines(result["probes"]):
            print(line)
    if args.stream_tokens:
        _stream(args, model, cfg, stream, seq, mb, device, result)
    # nothing is created before this
    out = prepare_out(Path(args.out), args.force, ev.EVAL_FILES, what)
    for path in ev.write_report(out, result):
        print(f"wrote {path}")
    return 0


def _stream_tokens(args, cfg, tokens, source: str):
    """The stream for --stream-tokens (the text or corpus given, else the run's first corpus from its
    start), checked long enough before any evaluation runs."""
    if not args.stream_tokens:
        return None
    if tokens is None:
        tokens = ev.corpus_tokens(cfg.data.paths[0], args.stream_tokens + 1)
        source = f"the run's corpus {cfg.data.paths[0]}"
    if len(tokens) < args.stream_tokens + 1:
        raise ValueError(
            f"{source} holds {len(tokens)} tokens, fewer than --stream-tokens {args.stream_tokens} "
            "+ 1. Fix: lower --stream-tokens or give a longer text or corpus"
        )
    return tokens


def _stream(args, model, cfg, stream, seq: int, mb: int, device, result: dict) -> None:
    """eval --stream-tokens: perplexity of one long stream without a cache, then through each --cache."""
    if (
        args.cache_positions == "original"
        and args.stream_tokens > cfg.model.max_position_embeddings
    ):
        print(
            f"warning: the stream runs past the {cfg.model.max_position_embeddings} positions the model was "
            "trained with; --cache-positions cache keeps rotary positions inside the cache",
            file=sys.stderr,
        )
    stream = torch.from_numpy(stream[: args.stream_tokens + 1])
    result["stream_reference"] = ev.block_perplexity(model, stream, seq, args.segment, mb, device)
    print(
        f"stream {args.stream_tokens} tokens, no cache ({seq}-token blocks, training attention): perplexity "
        f"{result['stream_reference']['ppl']:.2f}"
    )
    result["streaming"] = []
    for kind in args.cache.split(","):
        run = ev.streaming_perplexity(
            model,
            stream,
            kind,
            args.cache_sizes,
            args.cache_positions,
            args.chunk,
            args.segment,
            progress=not args.no_progress,
            time_limit=args.time_limit,
            cuda_graphs=not args.no_cuda_graphs,
        )
        result["streaming"].append(run)
        why = f" (stopped early: {run['stopped']})" if run["stopped"] else ""
        print(
            f"stream {run['tokens']} tokens, cache {kind}: perplexity {run['ppl']:.2f}, "
            f"{run['tokens_per_s']:.0f} tokens/s, peak KV {run['peak_kv_bytes'] / 2**20:.2f} MiB{why}"
        )
