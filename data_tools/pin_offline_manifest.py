"""Write data_tools/offline_manifest.json: the newest (or the given) version of each listed package, its file
and sha256. Run by whoever changes the corpus's package list, never by a build.

    python -m data_tools.pin_offline_manifest --cache DIR pypi:sympy debian:perl-doc pypi:numpy==2.1.3 ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .offline_corpus import DEFAULT_MANIFEST
from .offline_sources import sha256_of

WHEEL_TAGS = [
    "--only-binary",
    ":all:",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--abi",
    "abi3",
    "--abi",
    "none",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "any",
]


def pin(spec: str, cache: Path) -> dict:
    source, _, rest = spec.partition(":")
    name, _, version = rest.partition("==")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if source == "pypi":
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                *WHEEL_TAGS,
                "-d",
                tmp,
                f"{name}=={version}" if version else name,
            ]
            subprocess.run(cmd, check=True)
        elif source == "debian":
            if not version:
                out = subprocess.run(
                    ["apt-cache", "policy", name], capture_output=True, text=True, check=True
                )
                version = next(
                    line.split()[1] for line in out.stdout.splitlines() if "Candidate:" in line
                )
            subprocess.run(["apt-get", "download", "-q", f"{name}={version}"], cwd=tmp, check=True)
        else:
            raise SystemExit(f"{spec}: write pypi:NAME[==V] or debian:NAME[==V]")
        (f,) = list(Path(tmp).iterdir())
        if source == "pypi":
            version = f.name.split("-")[1]
        target = cache / f.name
        f.replace(target)
    return {
        "source": source,
        "name": name,
        "version": version,
        "file": target.name,
        "sha256": sha256_of(target),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("specs", nargs="+")
    ap.add_argument(
        "--cache", required=True, help="where the files are kept (a build can reuse them: --cache)"
    )
    ap.add_argument("--out", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--name", default="offline-100m")
    a = ap.parse_args(argv)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    pkgs = []
    for spec in a.specs:
        pkgs.append(pin(spec, cache))
        print(json.dumps(pkgs[-1]), flush=True)
    manifest = {
        "name": a.name,
        "heldout_fraction": 0.01,
        "tokenizer": {"vocab_size": 32000, "sample_bytes": 60_000_000},
        "packages": pkgs,
    }
    Path(a.out).write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
