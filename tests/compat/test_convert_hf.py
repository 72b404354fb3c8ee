"""Hugging Face conversion, CPU fp32, tiny random models of both families."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_sep.config import config_from_dict, dump_config
from megatron_sep.convert import ConversionError, export_hf, import_hf
from megatron_sep.checkpoint import load_model
from megatron_sep.model import build_model
from megatron_sep.checkpoint import CheckpointError, WeightsOnly, save_checkpoint

import transformers  # noqa: E402  (a test dependency)

from ..export_utils import export_tiny  # noqa: E402

MODELS = {  # rope settings away from transformers' defaults, so a key it does not read would show
    "neox": {"family": "neox", "rotary_pct": 0.5, "rotary_base": 5000.0},
    "llama": {"family": "llama", "num_kv_heads": 2, "tie_embeddings": True, "rotary_base": 50000.0},
    "llama_untied": {"family": "llama", "num_kv_heads": 4},
}


def project_checkpoint(tmp_path, tokenizer, model):
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "num_heads": 4,
                "vocab_size": 384,
                "max_position_embeddings": 128,
                **model,
            },
            "data": {"tokenizer": str(tokenizer), "seq_len": 64},
        }
    )
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():  # norms and biases away from their init, so a swapped name would show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(
        tmp_path / "run" / "checkpoints",
        5,
        WeightsOnly(m, cfg),
        {"consumed_samples": 0},
        dump_config(cfg),
        keep_last=1,
    )
    return m.eval()


def tokens_with_separators(tok, n=2, s=40):
    text = "The model reads, and writes. Does it stop? No; it goes on: line\n\tafter line!"
    ids = tok.encode(text)[:s]
    batch = torch.tensor([ids] * n)
    batch[1, ::3] = torch.randint(0, 384, (batch[1, ::3].numel(),))
    return batch


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers_with_equal_logits(corpus, tmp_path, name):
    from megatron_sep.data.tokenizer import load_tokenizer

    ours = project_checkpoint(tmp_path, corpus["tokenizer"], MODELS[name])
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = tokens_with_separators(load_tokenizer(corpus["tokenizer"]))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    assert (out / "tokenizer.json").is_file() and json.loads(
        (out / "generation_config.json").read_text()
    )
    mode = lambda name: (out / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")  # safetensors alone would write 0600


def hf_random(tmp_path, family):
    torch.manual_seed(1)
    if family == "neox":
        conf = transformers.GPTNeoXConfig(
            vocab_size=200,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            rotary_pct=0.5,
        )
        model = transformers.GPTNeoXForCausalLM(conf)
    else:
        conf = transformers.LlamaConfig(
            vocab_size=200,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=80,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(conf)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / f"hf_{family}")
    return model.eval(), tmp_path / f"hf_{family}"


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_import_gives_equal_logits_and_round_trips_exactly(tmp_path, family):
    hf, path = hf_random(tmp_path, family)
    import_hf(path, tmp_path / "imported")
    ours, cfg = load_model(tmp_path / "imported")
    tokens = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    back = export_hf(tmp_path / "imported", tmp_path / "back")
    a, b = load_file(str(path / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_import_for_sepllm_post_training(tmp_path):
    _, path = hf_random(tmp_path, "llama")
    import_hf(path, tmp_path / "imported", ["attention.kind=sepllm", "attention.separators=[5, 7]"])
    _, cfg = load_model(tmp_path / "imported")
    assert cfg.attention.kind == "sepllm" and cfg.attention.separators == [5, 7]


def test_bad_inputs(tmp_path, corpus):
    _, path = hf_random(tmp_path, "llama")
    conf = json.loads((path / "config.json").read_text())
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**conf, "model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not supported"):
        import_hf(bad, tmp_path / "x")
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "config.json").write_text(json.dumps({**conf, "intermediate_size": 64}))
    (mismatch / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match="do not match its config.json"):
        import_hf(mismatch, tmp_path / "y")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(conf))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
        )
    )
    with pytest.raises(ConversionError, match="missing"):
        import_hf(sharded, tmp_path / "z")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no `latest`"):
        export_hf(tmp_path / "empty", tmp_path / "w")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sep",
            "import-hf",
            "--hf",
            str(bad),
            "--out",
            str(tmp_path / "v"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not supported" in proc.stderr


SEPLLM = {"kind": "sepllm", "window": [3, 5, 200], "init_tokens": 2, "hybrid": "none"}


@pytest.mark.parametrize(
    "name,attention",
    [
        ("llama", SEPLLM),
        ("neox", {**SEPLLM, "hybrid": "H"}),
        ("llama_untied", {"kind": "streamingllm", "window": 4}),
        ("neox", {"kind": "fixed_interval", "fixed_interval": 3, "window": 4}),
    ],
)
def test_sepllm_export_with_remote_code(corpus, tmp_path, name, attention):
    ours, out, tok = export_tiny(
        tmp_path, corpus["tokenizer"], MODELS[name], attention, num_layers=3
    )
    cfg = ours.cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = tokens_with_separators(tok)
    with torch.no_grad():
        dense = build_model(
            config_from_dict({**{"model": cfg.model.__dict__}, "data": {"seq_len": 64}})
        )
        dense.load_state_dict(ours.state_dict())
        assert (
            dense(tokens) - ours(tokens)
        ).abs().max() > 1e-3  # the pattern matters on this input
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
    back, back_cfg = load_model(import_hf(out, tmp_path / "reimported"))
    with torch.no_grad():  # the attention pattern survives export -> import
        assert torch.allclose(back(tokens), ours(tokens), atol=1e-5)


def test_generate_command(corpus, tmp_path):
    project_checkpoint(tmp_path, corpus["tokenizer"], MODELS["llama"])
    for extra in (
        [],
        ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--evict"],
        ["--cache", "streaming", "--cache-sizes", "2,0,8,16", "--prefill-chunk", "3"],
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_sep",
                "generate",
                "--load",
                str(tmp_path / "run"),
                "--prompt",
                "The model reads.",
                "--max-new-tokens",
                "8",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_sampling_respects_top_k_and_top_p():
    from megatron_sep.inference.generate import sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])).repeat(2000, 1)
    assert set(sample(logits, 2, 1.0, gen).tolist()) == {0, 1}
    assert set(sample(logits, 0, 0.8, gen).tolist()) == {0, 1, 2}  # 0.5 + 0.25 < 0.8 <= 0.9
    counts = torch.bincount(sample(logits, 0, 1.0, gen), minlength=5) / 2000
    assert abs(counts[0].item() - 0.5) < 0.05


def test_sepllm_export_tokenizer_loads_without_remote_code(corpus, tmp_path, monkeypatch, capsys):
    """A SepLLM export's tokenizer is a built-in class with no auto_map: AutoTokenizer loads it
    without running or asking about the model's remote code; the export says how (issue 39)."""
    _, out, tok = export_tiny(tmp_path, corpus["tokenizer"], MODELS["llama"], SEPLLM, num_layers=3)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in conf and hasattr(transformers, conf["tokenizer_class"])
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    text = "The model reads, and writes. Does it stop? No; it goes on."
    assert hf_tok(text).input_ids == tok.encode(text) and not asked
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x reads tokenizer_config.json first
        transformers.AutoTokenizer.from_pretrained(out)
        assert not asked
    with pytest.raises(ValueError, match="trust_remote_code"):  # the model still needs the opt-in
        transformers.AutoModelForCausalLM.from_pretrained(out)
    from megatron_sep.convert.commands import cmd_export_hf

    args = dict(load=str(tmp_path / "run"), out=str(tmp_path / "again"), dtype="fp32")
    cmd_export_hf(type("Args", (), {**args, "tokenizer": None, "force": False}))
    assert "AutoTokenizer.from_pretrained(dir, trust_remote_code=False)" in capsys.readouterr().out
