#!/usr/bin/env bash
# torchtitan's llama3 trainer on our 1.3B shape, one GPU, offline: the outside reference for train_throughput.py.
#   bash benchmarks/torchtitan_compare.sh OUTDIR [STEPS]      # from the repo root; STEPS default 30
# Writes OUTDIR/torchtitan_llama1.3b.toml, OUTDIR/torchtitan_log.txt and OUTDIR/torchtitan.json (medians of
# tps, MFU and peak memory over the steps after the first 5).
# Needs system python3 with torch (2.11 ok) and triton, plus the wheels in .whl/torchtitan, made on a machine
# with PyPI by (torchtitan 0.2.2: 0.3.0 imports torch.distributed.fsdp.DataParallelMeshDims, absent in 2.11):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .whl/torchtitan torchtitan==0.2.2 tyro==1.0.17 docstring_parser==0.18.0 \
#     typeguard==4.6.1 torchdata==0.11.0 tokenizers==0.23.3 tensorboard==2.21.0 protobuf==7.36.2 \
#     absl-py==2.5.1 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 xxhash==3.6.0
# Env: PYTHON (default python3), TT_DATASETS=auto|real|shim (default auto), TT_WHEELHOUSE, TT_EXTRA_ARGS
# (appended to the torchtitan command line, e.g. for a smoke test).
set -euo pipefail

usage="usage: bash benchmarks/torchtitan_compare.sh OUTDIR [STEPS]"
OUTDIR=${1:?$usage}
STEPS=${2:-30}
WARMUP=5
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHL=${TT_WHEELHOUSE:-$REPO/.whl/torchtitan}
TT_VERSION=0.2.2
FFN_HIDDEN=5504
[[ $STEPS =~ ^[0-9]+$ ]] && ((STEPS > WARMUP)) || { echo "STEPS must be an integer > $WARMUP" >&2; exit 2; }
# it replaces its own folders in OUTDIR (site, data, ...): only a new directory or one it made before
if [[ -e $OUTDIR && ! -f $OUTDIR/torchtitan_llama1.3b.toml && -n $(ls -A "$OUTDIR" 2>/dev/null || echo file) ]]; then
    echo "error: $OUTDIR is not empty and not an earlier torchtitan_compare output. Fix: choose a new OUTDIR" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# --- wheels: fail early and by name, not with an ImportError deep inside torchtitan
REQUIRED=(torchtitan-$TT_VERSION tyro docstring_parser typeguard torchdata tokenizers tensorboard protobuf absl_py)
DS_EXTRA=(datasets dill multiprocess xxhash)  # the real HF `datasets`; it also needs pyarrow+pandas from the system
wheel_of() { compgen -G "$WHL/$1-*.whl" | head -n1 || true; }
missing=()
for w in "${REQUIRED[@]}"; do [[ -n $(wheel_of "$w") ]] || missing+=("$w"); done
if ((${#missing[@]})); then
    echo "ERROR: missing wheel(s) in $WHL: ${missing[*]} (see the pip download line at the top of $0)" >&2
    exit 1
fi
"$PY" -c 'import torch, triton' || { echo "ERROR: $PY lacks torch or triton" >&2; exit 1; }

# --- install into folders on PYTHONPATH, not site-packages: nothing on the machine changes
SITE=$OUTDIR/site
rm -rf "$SITE" "$OUTDIR/site_ds" "$OUTDIR/shim"
req=()
for w in "${REQUIRED[@]}"; do req+=("$(wheel_of "$w")"); done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --find-links "$WHL" --target "$SITE" "${req[@]}"

# --- HF `datasets`: torchtitan 0.2.2 imports it at module level (hf_datasets/text_datasets.py), and the real
# package needs pyarrow (55 MB wheel) and pandas, too big to carry. Use the real one where the machine has
# those; else a stand-in with the three names torchtitan's text loader uses (map-style JSON lines only).
DS_MODE=${TT_DATASETS:-auto}
DATA=$OUTDIR/data
mkdir -p "$DATA/c4_synth" "$DATA/tokenizer"
ds_preflight() {  # the exact calls torchtitan makes, on a throwaway file
    local tmp; tmp=$(mktemp -d)
    echo '{"text": "a b"}' >"$tmp/x.jsonl"
    PYTHONPATH=$1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_HOME=$OUTDIR/hf_home "$PY" -c "
import sys
from datasets import Dataset, load_dataset
from datasets.distributed import split_dataset_by_node
ds = split_dataset_by_node(load_dataset(sys.argv[1], split='train'), 0, 1)
assert isinstance(ds, Dataset) and next(iter(ds))['text'] == 'a b'
" "$tmp" >"$OUTDIR/datasets_preflight.txt" 2>&1
    local rc=$?
    rm -rf "$tmp"
    return $rc
}
DS_PATH=
if [[ $DS_MODE != shim ]]; then
    ds_whl=()
    for w in "${DS_EXTRA[@]}"; do  # only what the system lacks, so the system's pyarrow/pandas/fsspec stay in use
        "$PY" -c "import $w" 2>/dev/null && continue
        f=$(wheel_of "$w")
        [[ -n $f ]] || { echo "note: no $w wheel in $WHL" >&2; continue; }
        ds_whl+=("$f")
    done
    if ((${#ds_whl[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$OUTDIR/site_ds" "${ds_whl[@]}" || true
    fi
    if ds_preflight "$OUTDIR/site_ds:$SITE"; then
        DS_PATH=$OUTDIR/site_ds
        DS_MODE=real
    elif [[ $DS_MODE == real ]]; then
        echo "ERROR: TT_DATASETS=real but HF datasets does not work here:" >&2
        cat "$OUTDIR/datasets_preflight.txt" >&2
        exit 1
    else
        echo "note: HF datasets unusable here ($(tail -n1 "$OUTDIR/datasets_preflight.txt")); using the stand-in" >&2
        DS_MODE=shim
    fi
fi
if [[ $DS_MODE == shim ]]; then
    DS_PATH=$OUTDIR/shim
    mkdir -p "$DS_PATH/datasets"
    cat >"$DS_PATH/datasets/__init__.py" <<'EOF'
# Stand-in for HF `datasets` (no pyarrow): the names torchtitan 0.2.2's text loader uses, for local JSON lines.
import glob, json, os

__version__ = "0+torchtitan-compare-shim"


class Dataset:
    def __init__(self, rows):
        self._rows = rows

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)

    def skip(self, n):
        return Dataset(self._rows[n:])


class IterableDataset:
    pass


def load_dataset(path, name=None, split="train", streaming=False, **kwargs):
    files = sorted(glob.glob(os.path.join(path, "*.json*"))) if os.path.isdir(path) else [path]
    rows = []
    for f in files:
        with open(f) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    if not rows:
        raise FileNotFoundError(f"no JSON lines under {path}")
    return Dataset(rows)
EOF
    cat >"$DS_PATH/datasets/distributed.py" <<'EOF'
def split_dataset_by_node(ds, rank, world_size):
    return type(ds)(ds._rows[rank::world_size])
EOF
fi
echo "datasets: $DS_MODE"

# --- tokenizer and data made here (no hub): a 32000-entry WordLevel vocab, so the embedding and output layer
# have our shape, and Zipf-distributed words from it. Throughput does not depend on the text.
PYTHONPATH=$SITE "$PY" - "$DATA" <<'EOF'
import json, os, random, sys
from tokenizers import Tokenizer, models, pre_tokenizers
out = sys.argv[1]
V = 32000
special = ["<unk>", "<s>", "</s>"]
vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(V - len(special))])}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.add_special_tokens(special)
tok.save(os.path.join(out, "tokenizer", "tokenizer.json"))
with open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
               "add_eos_token": False, "model_max_length": 1 << 20}, f)
assert tok.get_vocab_size() == V, tok.get_vocab_size()
rng = random.Random(0)
words = list(vocab)[len(special):]
weights = [1.0 / (r + 1) for r in range(len(words))]
with open(os.path.join(out, "c4_synth", "train.jsonl"), "w") as f:  # ~1.6M tokens; torchtitan loops it
    for _ in range(1600):
        f.write(json.dumps({"text": " ".join(rng.choices(words, weights, k=rng.randint(200, 1800)))}) + "\n")
EOF

# --- our shape as an extra llama3 flavor, imported by torchtitan (experimental.custom_import) before lookup.
# FFN: torchtitan takes int(2*4*dim/3) = 5461 rounded up to multiple_of; multiple_of=128 gives 5504 exactly.
# RoPE: llama3 applies Llama-3.1 frequency scaling by default; scaling_factor=1.0 makes it plain theta=10000.
mkdir -p "$OUTDIR/pymod"
cat >"$OUTDIR/pymod/sep_flavor.py" <<EOF
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

llama3_args["sep1.3b"] = TransformerModelArgs(
    dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, vocab_size=32000,
    multiple_of=128, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000,
    rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0), max_seq_len=4096,
)
# same vocab and FFN rule, 2 small layers: smoke tests (TT_EXTRA_ARGS="--model.flavor sep_tiny")
llama3_args["sep_tiny"] = TransformerModelArgs(
    dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32000, multiple_of=128,
    rope_theta=10000, rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0), max_seq_len=4096,
)
EOF

# --- config. On 1 GPU torchtitan does not wrap in FSDP; bf16 comes from autocast over fp32 params
# (mixed_precision_param), grads and AdamW state stay fp32.
CFG=$OUTDIR/torchtitan_llama1.3b.toml
cat >"$CFG" <<EOF
[job]
dump_folder = "$OUTDIR/dump"
description = "torchtitan $TT_VERSION llama3 1.3B (megatron-sep shape) throughput"

[profiling]
enable_profiling = false

[metrics]
log_freq = 1
disable_color_printing = true
enable_tensorboard = false

[model]
name = "llama3"
flavor = "sep1.3b"
hf_assets_path = "$DATA/tokenizer"

[optimizer]
name = "AdamW"
lr = 3e-4
eps = 1e-8
weight_decay = 0.1
implementation = "fused"

[lr_scheduler]
warmup_steps = 2

[training]
local_batch_size = 2
seq_len = 4096
max_norm = 1.0
steps = $STEPS
dataset = "c4_test"
dataset_path = "$DATA/c4_synth"
mixed_precision_param = "bfloat16"
mixed_precision_reduce = "float32"

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
tensor_parallel_degree = 1
pipeline_parallel_degree = 1
context_parallel_degree = 1

[checkpoint]
enable = false

[activation_checkpoint]
mode = "none"

[compile]
enable = true
components = ["model", "loss"]

[experimental]
custom_import = "sep_flavor"
EOF

# --- run. Multicast off as the shared H200 hosts require; the hub is unreachable, so say so up front.
LOG=$OUTDIR/torchtitan_log.txt
export PYTHONPATH=$SITE:$DS_PATH:$OUTDIR/pymod${PYTHONPATH:+:$PYTHONPATH}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_HOME=$OUTDIR/hf_home TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$OUTDIR"  # torchtitan resolves some default paths against the working directory
set +e
# shellcheck disable=SC2086
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m torchtitan.train --job.config_file "$CFG" ${TT_EXTRA_ARGS:-} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || { echo "ERROR: torchtitan exited $rc; see $LOG" >&2; exit "$rc"; }

# --- summary
"$PY" - "$LOG" "$CFG" "$OUTDIR/torchtitan.json" "$WARMUP" "$TT_VERSION" "$FFN_HIDDEN" "$DS_MODE" <<'EOF'
import json, os, re, statistics, sys
import torch
log, cfg, out, warmup, version, ffn, ds_mode = sys.argv[1:]
warmup = int(warmup)
text = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read())
pat = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naif]+)\s+grad_norm:\s*([-\d.naif]+)\s+memory:\s*([\d.]+)GiB"
                 r"\(([\d.]+)%\)\s+tps:\s*([\d,]+)\s+tflops:\s*([\d,.]+)\s+mfu:\s*([\d.]+)%")
steps = {}
for m in pat.finditer(text):
    s = int(m.group(1))
    steps[s] = dict(step=s, loss=float(m.group(2)), grad_norm=float(m.group(3)), mem_reserved_gib=float(m.group(4)),
                    mem_reserved_pct=float(m.group(5)), tps=int(m.group(6).replace(",", "")),
                    tflops=float(m.group(7).replace(",", "")), mfu_pct=float(m.group(8)))
rows = [steps[s] for s in sorted(steps)]
post = [r for r in rows if r["step"] > warmup]
if not post:
    sys.exit(f"ERROR: no step lines after step {warmup} in {log}")
first = lambda rx: (lambda m: m.group(1) if m else None)(re.search(rx, text))
nparams = first(r"size:\s*([\d,]+)\s+total parameters")
med = lambda k: statistics.median(r[k] for r in post)
res = {
    "framework": "torchtitan", "torchtitan_version": version,
    "torch_version": torch.__version__,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "model": "llama3 flavor sep1.3b: 24 layers, dim 2048, 16 heads, 16 kv heads, ffn %s, vocab 32000, "
             "rope theta 10000 (no scaling), RMSNorm eps 1e-5, untied embeddings" % ffn,
    "ffn_hidden": int(ffn), "n_params": int(nparams.replace(",", "")) if nparams else None,
    "extra_args": os.environ.get("TT_EXTRA_ARGS", ""),
    "seq_len": 4096, "local_batch_size": 2, "tokens_per_step": 2 * 4096,
    "precision": ("float8 linears (torchao) + " if "float8" in os.environ.get("TT_EXTRA_ARGS", "") else "")
    + "bf16 autocast over fp32 params (torchtitan on 1 GPU, no FSDP), fused AdamW",
    "compile": True, "activation_checkpointing": False, "datasets": ds_mode,
    "warmup_steps_skipped": warmup, "steps_measured": len(post),
    "median_tps": med("tps"), "median_tflops": med("tflops"), "median_mfu_pct": med("mfu_pct"),
    "flops_per_token": 6 * (int(nparams.replace(",", "")) - 32000 * 2048) + 6 * 24 * 16 * 256 * 4096
    if nparams and not os.environ.get("TT_EXTRA_ARGS") else None,
    "mfu_note": "torchtitan's: 6*(non-embedding params) + 6*layers*heads*(2*head_dim)*seq flops per token "
                "(causal mask not halved), over 989 TFLOP/s for H200",
    "median_mem_reserved_gib": med("mem_reserved_gib"), "peak_mem_reserved_gib": max(r["mem_reserved_gib"] for r in post),
    "mem_note": "torchtitan's per-step torch.cuda max_memory_reserved, peak reset each logged step",
    "steps": rows, "config_toml": open(cfg).read(),
}
json.dump(res, open(out, "w"), indent=1)
print(f"torchtitan {version}: median tps {res['median_tps']:,.0f}, MFU {res['median_mfu_pct']:.2f}%, "
      f"peak reserved {res['peak_mem_reserved_gib']:.2f} GiB over steps {warmup + 1}..{rows[-1]['step']} -> {out}")
EOF
