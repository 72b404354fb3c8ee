"""lm-eval-harness over an export gives the project's own log-likelihoods (run by `make test-hf`).

A local task (a jsonl file of context / continuation pairs) goes through `lm_eval.simple_evaluate` with
the `hf` model; each document's summed log-likelihood must equal the project's model and tokenizer's
within 1e-4 per token (fp32; lm-eval pads batches on the right without a mask, which the causal mask
makes harmless).
"""

import json

import pytest
import torch

import lm_eval  # installed by `make test-hf` only, not part of the lock
from lm_eval.tasks import TaskManager

from tests.export_utils import export_tiny

DOCS = [
    ("The model reads a token,", " and writes the next one."),
    ("Separators mark where each sentence ends. So", " attention keeps them: summaries!"),
    ("Numbers like 3.14 and 1,000", " appear too; naïve café."),
    ("  Leading spaces", " then\ta tab and\nnew lines."),
]
CASES = {
    "neox_dense": ({"family": "neox", "rotary_pct": 0.25}, None),
    "llama_sepllm": (
        {"family": "llama", "num_kv_heads": 2},
        {"kind": "sepllm", "window": 4, "init_tokens": 2},
    ),
}


def local_task(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in DOCS))
    (folder / "sep_local.yaml").write_text(
        "task: sep_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_lm_eval_loglikelihoods_equal_project_losses(corpus, tmp_path, name):
    ours, out, tok = export_tiny(tmp_path, corpus["tokenizer"], *CASES[name])
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(out), "trust_remote_code": True, "dtype": "float32"},
        tasks=["sep_local"],
        batch_size=2,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(local_task(tmp_path))),
    )
    samples = sorted(results["samples"]["sep_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for (context, continuation), sample in zip(DOCS, samples):
        theirs = sample["resps"][0][0][0]
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        assert whole[: len(ctx)] == ctx  # the context's tokens survive the concatenation here
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(ours(ids)[0].double(), -1)
        mine = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
        assert abs(theirs - mine) <= 1e-4 * (len(whole) - len(ctx)), (name, context, theirs, mine)


def test_offline_lastword_task_perplexity_matches_the_project_model(corpus, tmp_path, monkeypatch):
    """`megatron-sep lm-eval-task` builds a local task that lm-eval runs with no download; its perplexity
    is exp(-mean target log-likelihood) of the project's own model (fp32, 1e-4 relative)."""
    from megatron_sep.experiments.lm_eval_task import write_task

    ours, out, tok = export_tiny(tmp_path, corpus["tokenizer"], *CASES["llama_sepllm"])
    built = write_task(corpus["jsonl"], tmp_path / "tasks", docs=6, max_chars=200).parent
    tasks = built.rename(tmp_path / "moved")  # the task folder holds no absolute path
    monkeypatch.chdir(out)  # nor a path relative to where it was built
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(out), "trust_remote_code": True, "dtype": "float32"},
        tasks=["heldout_lastword"],
        batch_size=2,
        device="cpu",
        task_manager=TaskManager(include_path=str(tasks)),
    )
    got = results["results"]["heldout_lastword"]
    lls = []
    for row in map(json.loads, open(tasks / "heldout_lastword.jsonl")):
        whole, ctx = tok.encode(row["context"] + row["target"]), tok.encode(row["context"])
        with torch.no_grad():
            logp = torch.log_softmax(ours(torch.tensor([whole]))[0].double(), -1)
        lls.append(sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole))))
    want = float(torch.tensor(lls).mean().neg().exp())
    assert abs(got["perplexity,none"] - want) <= 1e-4 * want, (got, want)
    assert 0.0 <= got["acc,none"] <= 1.0
