"""Several drafts of one target side by side: speedup and acceptance against k, from the speculative.json files
that benchmarks/speculative_decoding.py wrote.

  python3 benchmarks/speculative_compare.py --out PNG [--force] NAME=DIR [NAME=DIR ...]

An existing PNG is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("runs", nargs="+", help="NAME=DIR, DIR holding speculative.json")
    args = ap.parse_args()
    if Path(args.out).exists() and not (args.force and Path(args.out).is_file()):
        raise SystemExit(
            f"error: {args.out} exists. Fix: choose another --out, or pass --force to replace the file"
        )
    try:
        plot(args)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as e:  # unreadable or foreign JSON, an unwritable --out
        raise SystemExit(
            f"error: {type(e).__name__}: {e}. Fix: pass NAME=DIR with DIR written by "
            "benchmarks/speculative_decoding.py, and an --out in a writable directory"
        ) from None


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for item in args.runs:
        name, _, d = item.partition("=")
        path = Path(d) / "speculative.json"
        if not path.is_file():
            raise SystemExit(
                f"error: {path} does not exist. Fix: pass NAME=DIR with DIR written by "
                "benchmarks/speculative_decoding.py"
            )
        runs = json.loads(path.read_text())["runs"]
        greedy = sorted((r["k"], r) for r in runs.values() if r["greedy"])
        ks = [k for k, _ in greedy]
        a.plot(ks, [r["speedup"] for _, r in greedy], "o-", label=name)
        b.plot(ks, [r["acceptance"] for _, r in greedy], "o-", label=name)
    a.axhline(1.0, color="gray", ls=":")
    a.set_ylabel("greedy tokens/s vs the target alone")
    b.set_ylabel("acceptance rate")
    for ax in (a, b):
        ax.set_xlabel("draft tokens per round (k)")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
