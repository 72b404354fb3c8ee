"""Merge the eval.json files of the streaming benchmark's stages (benchmarks/streaming.sh) into one report:
eval.json with every cache's run and the no-cache reference, the eval plots, and a markdown table on stdout.

    python3 benchmarks/streaming_report.py --out DIR A/eval.json B/eval.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_sep.outdir import prepare_out
from megatron_sep.inference.evaluate import EVAL_FILES, write_report
from megatron_sep.inference.plots import label, ppl_over_reference


def merge(paths: list[Path]) -> dict:
    parts = [json.loads(p.read_text()) for p in paths]
    result = {k: v for k, v in parts[0].items() if k != "streaming"}
    result["streaming"] = [run for part in parts for run in part.get("streaming", [])]
    refs = [part["stream_reference"] for part in parts if "stream_reference" in part]
    if refs:
        result["stream_reference"] = refs[0]
    return result


def table(result: dict) -> str:
    ref = result.get("stream_reference")
    rows = [
        "| cache | tokens streamed | ppl | first / last segment ppl | ppl / no-cache ppl per whole segment "
        "(min-max) | tokens/s | peak KV MiB | stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if ref:
        segs = ref["segments"]
        rows.append(
            f"| no cache ({ref['seq_len']}-token blocks) | {ref['tokens']:,} | {ref['ppl']:.2f} | "
            f"{segs[0]['ppl']:.2f} / {segs[-1]['ppl']:.2f} | 1 | | | |"
        )
    for run in result["streaming"]:
        segs = run["segments"]
        ratios = [y for _, y in ppl_over_reference(run, ref)] if ref else []
        spread = f"{min(ratios):.4f}-{max(ratios):.4f}" if ratios else ""
        rows.append(
            f"| {label(run)} | {run['tokens']:,} | {run['ppl']:.2f} | {segs[0]['ppl']:.2f} / "
            f"{segs[-1]['ppl']:.2f} | {spread} | {run['tokens_per_s']:,.0f} | "
            f"{run['peak_kv_bytes'] / 2**20:.2f} | {run['stopped'] or ''} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("evals", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--force", action="store_true", help="replace an earlier report's files in --out"
    )
    args = p.parse_args()
    try:  # errors in one line, no traceback
        result = merge(args.evals)
        for path in write_report(
            prepare_out(args.out, args.force, EVAL_FILES, "replace the report's files"), result
        ):
            print(f"wrote {path}")
    except (json.JSONDecodeError, KeyError, IndexError) as e:
        print(f"error: {e!r}: pass eval.json files written by `megatron-sep eval`", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
