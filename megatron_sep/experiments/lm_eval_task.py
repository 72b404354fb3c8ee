"""A LAMBADA-style local task for lm-eval-harness, built from held-out text, that runs offline.

lm-eval's own tasks (lambada_openai, piqa, ...) read their data from the Hugging Face Hub, so they need a
download or a filled HF cache. A local task reads a jsonl file beside its YAML and needs neither. Each example is the end of a passage: the context is the passage up to its last word, the
target is that word; lm-eval reports the target's accuracy under greedy decoding and its perplexity."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..config import ConfigError

# lm-eval hands data_files to `datasets` as they are, relative to the caller's cwd; a loader beside the
# YAML (lm-eval resolves `!function` from the YAML's folder) finds the jsonl wherever the folder moves
LOADER = """\"\"\"Written by `megatron-sep lm-eval-task`: NAME.jsonl from this file's folder.\"\"\"

from pathlib import Path


def data_file() -> str:
    return str(Path(__file__).with_name("NAME.jsonl"))


def load(**_):
    import datasets

    return datasets.load_dataset("json", data_files={"test": data_file()})
"""

# the passage's last word, without punctuation
WORD_AT_END = re.compile(r"^(.*\S)\s+(\w[\w'-]*)[\W]*$", re.S)


def examples(input_path: Path, docs: int, text_key: str, max_chars: int, seed: int) -> list[dict]:
    """Passages of up to max_chars, cut at a paragraph or sentence end, ending in a word of 3+ letters."""
    rows = []
    with open(input_path, encoding="utf-8") as f:
        for n, line in enumerate(_lines(f, input_path), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                text = None
            if not isinstance(text, str):
                raise ConfigError(
                    "--input",
                    f"{input_path}:{n}",
                    f"is not a JSON object with a {text_key!r} string",
                    "give a .jsonl of documents, or name the field with --text-key",
                )
            for para in re.split(r"\n\s*\n", text):
                para = " ".join(para.split())[-max_chars:]
                m = WORD_AT_END.match(para)
                if m and len(m.group(2)) >= 3 and len(m.group(1)) >= 64:
                    rows.append({"context": m.group(1), "target": " " + m.group(2)})
    if not rows:
        raise ConfigError(
            "--input",
            str(input_path),
            "holds no passage to build examples from",
            "give held-out documents whose paragraphs have 64+ characters before their last word",
        )
    random.Random(seed).shuffle(rows)
    return rows[:docs]


def _lines(f, path: Path):
    try:
        yield from f
    except UnicodeDecodeError:
        raise ConfigError(
            "--input", str(path), "is not UTF-8 text", "give a .jsonl of documents"
        ) from None


def write_task(
    input_path: str | Path,
    out: str | Path,
    name: str = "heldout_lastword",
    docs: int = 500,
    text_key: str = "text",
    max_chars: int = 1500,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """OUT/NAME.jsonl, OUT/NAME.yaml and its loader OUT/NAME_data.py; pass OUT to lm_eval
    --include_path and NAME to --tasks. The input is read and checked before anything is written; an OUT that holds files needs force (and then only
    the task's own files are replaced)."""
    from ..outdir import prepare_out

    input_path, out = Path(input_path), Path(out)
    if input_path.is_dir() or not input_path.exists():
        raise ConfigError(
            "--input",
            str(input_path),
            "is a directory" if input_path.is_dir() else "file not found",
            "give a .jsonl of held-out documents",
        )
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ConfigError(
            "--name", name, "a task name is letters, digits and _", "e.g. heldout_lastword"
        )
    rows = examples(input_path, docs, text_key, max_chars, seed)
    owned = (f"{name}.jsonl", f"{name}.yaml", f"{name}_data.py")
    prepare_out(out, force, owned, "replace the task's own files")
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{name}_data.py").write_text(LOADER.replace("NAME", name))
    (out / f"{name}.yaml").write_text(
        f"task: {name}\ncustom_dataset: !function {name}_data.load\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return out / f"{name}.yaml"
