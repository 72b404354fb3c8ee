"""import-neox: GPT-NeoX configs (with SepLLM's NeoX flags) and GPT-NeoX / DeepSpeed pipeline checkpoints.

The source model is a transformers GPTNeoXForCausalLM with random weights. The test writes it out as GPT-NeoX
saves it under tensor parallelism 2 (DeepSpeed's per-layer files, column-parallel weights split on dim 0,
row-parallel on dim 1, the vocabulary padded to 128 x tp), imports that, and compares logits: float32,
within 1e-4 as the HF conversion tests.
"""

import pytest
import torch
import yaml

from megatron_sep.convert import ConversionError
from megatron_sep.checkpoint import load_model
from megatron_sep.convert.neox import import_neox

LAYERS, HIDDEN, HEADS, TP = 2, 64, 4, 2
COLUMN = (
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
)
ROW = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def neox_yaml(corpus, **extra):
    cfg = {
        "pipe-parallel-size": 1,
        "model-parallel-size": TP,
        "num-layers": LAYERS,
        "hidden-size": HIDDEN,
        "num-attention-heads": HEADS,
        "seq-length": 32,
        "max-position-embeddings": 64,
        "pos-emb": "rotary",
        "rotary-pct": 0.25,
        "no-weight-tying": True,
        "gpt-j-residual": True,
        "output-layer-parallelism": "column",
        "attention-config": [[["global"], LAYERS]],
        "optimizer": {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
        "min_lr": 6e-5,
        "zero_optimization": {"stage": 1},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "checkpoint-activations": True,
        "gradient_clipping": 1.0,
        "weight-decay": 0.1,
        "fp16": {"enabled": True},
        "train-iters": 100,
        "lr-decay-iters": 100,
        "lr-decay-style": "cosine",
        "warmup": 0.01,
        "checkpoint-factor": 50,
        "eval-interval": 20,
        "eval-iters": 2,
        "log-interval": 5,
        "data-path": corpus["prefix"],
        "split": "949,50,1",
        "tokenizer-type": "SPMTokenizer",
        "vocab-file": str(corpus["tokenizer"]),
        "launcher": "pdsh",
        "bias-gelu-fusion": True,
    }
    cfg.update(extra)
    return cfg


def write_neox_checkpoint(hf, folder, tp=TP):
    """GPT-NeoX's save layout for `hf` (a GPTNeoXForCausalLM) under tensor parallelism `tp`."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    vocab = sd["gpt_neox.embed_in.weight"].shape[0]
    # NeoX pads the vocabulary to make_vocab_size_divisible_by x tp
    rows = -(-vocab // (128 * tp)) * 128 * tp

    def pad(t):
        return torch.cat([t, torch.randn(rows - vocab, t.shape[1])])  # padding rows hold anything

    step = folder / "global_step10"
    step.mkdir(parents=True)
    (folder / "latest").write_text("global_step10")

    def save(layer, per_rank):
        for r in range(tp):
            torch.save(per_rank(r), step / f"layer_{layer:02d}-model_{r:02d}-model_states.pt")

    save(0, lambda r: {"word_embeddings.weight": pad(sd["gpt_neox.embed_in.weight"]).chunk(tp)[r]})
    for i in range(LAYERS):
        prefix = f"gpt_neox.layers.{i}."
        block = {
            k[len(prefix) :]: v
            for k, v in sd.items()
            if k.startswith(prefix) and "masked_bias" not in k and not k.endswith("attention.bias")
        }

        def shard(r, block=block, i=i):
            out = {}
            for k, v in block.items():
                v = v.chunk(tp, 0)[r] if k in COLUMN else v.chunk(tp, 1)[r] if k in ROW else v
                if i == 1:  # gpt-neox >= 2.0 names the MLP linear1 / linear2
                    k = k.replace("mlp.dense_h_to_4h.", "mlp.linear1.").replace(
                        "mlp.dense_4h_to_h.", "mlp.linear2."
                    )
                out[k] = v.clone()
            # a buffer NeoX saves; not a weight
            out["attention.rotary_emb.inv_freq"] = torch.ones(4)
            return out

        save(2 + i, shard)
    save(
        LAYERS + 3,
        lambda r: {
            "norm.weight": sd["gpt_neox.final_layer_norm.weight"],
            "norm.bias": sd["gpt_neox.final_layer_norm.bias"],
        },
    )
    head = sd[
        "embed_out.weight" if "embed_out.weight" in sd else "lm_head.weight"
    ]  # transformers 4 / 5 name
    save(LAYERS + 4, lambda r: {"final_linear.weight": pad(head).chunk(tp)[r]})


def hf_neox(vocab):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        rotary_pct=0.25,
        max_position_embeddings=64,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_neox_checkpoint_gives_the_source_models_logits(corpus, tmp_path):
    from megatron_sep.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(corpus["tokenizer"]).vocab_size
    hf = hf_neox(vocab)
    write_neox_checkpoint(hf, tmp_path / "neox")
    (tmp_path / "neox.yml").write_text(yaml.safe_dump(neox_yaml(corpus)))
    out, notes = import_neox(tmp_path / "neox.yml", tmp_path / "ours", tmp_path / "neox", gpus=8)
    ours, cfg = load_model(out)
    tokens = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    # the config: every value that carries over, the ones that change meaning noted
    assert (
        cfg.parallel.tp,
        cfg.parallel.zero,
        cfg.train.micro_batch_size,
        cfg.train.global_batch_size,
    ) == (2, 1, 4, 32)
    assert (
        cfg.data.split == [949, 50, 1]
        and cfg.optim.beta2 == 0.95
        and cfg.optim.warmup_fraction == 0.01
    )
    assert cfg.train.activation_checkpointing == "full" and cfg.attention.kind == "dense"
    assert any("fp16 becomes bf16" in n for n in notes)
    assert (out / "config.yaml").is_file()


def test_sepllm_neox_flags_map_to_attention(corpus, tmp_path):
    """The flags of SepLLM's GPT-NeoX fork (its sample configs), on a Pythia-160M-shaped config."""
    flags = {
        "separator_token_ids": [15, 13, 32, 2, 28, 27, 209, 186, 187],
        "PADDING_ID": 0,
        "prefill_local_window_size": 64,
        "generate_local_window_size": 64,
        "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True,
        "prefill_loc_win_size_list": [64, 128],
        "init_tok_max_idx": 2,
        "USE_BiPE": False,
        "USE_ORIGINAL_FULL_ATTEN": False,
        "streamingLLM": False,
        "USE_SEP_ATTN_KERNEL_ACCELERATOR": True,
        "PRINT_KV_RATIO": True,
        "print_ratio_intervals": 8000,
    }
    (tmp_path / "sep.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **flags)))
    out, notes = import_neox(tmp_path / "sep.yml", tmp_path / "out")
    a = yaml.safe_load((out / "config.yaml").read_text())["attention"]
    assert a["kind"] == "sepllm" and a["separators"] == flags["separator_token_ids"]
    # SepLLM's NeoX counts forward passes there: 8000 micro-batches are 4000 steps of 2
    assert a["window"] == [64, 128] and a["init_tokens"] == 3 and a["stats_interval"] == 4000
    assert any("print_ratio_intervals=8000 counts forward passes" in n for n in notes)
    assert any("generate_" in n for n in notes)
    flags.update(USE_ORIGINAL_FULL_ATTEN=True)
    (tmp_path / "dense.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **flags)))
    out, _ = import_neox(tmp_path / "dense.yml", tmp_path / "out2")
    assert yaml.safe_load((out / "config.yaml").read_text())["attention"]["kind"] == "dense"


def test_neox_checkpoint_history_and_logging_carry_over(corpus, tmp_path):
    """Pythia's checkpoint keys and NeoX's logging keys: mapped, or named in a note, never dropped."""
    extra = {
        "keep-last-n-checkpoints": 3,
        "extra-save-iters": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        "use_wandb": True,
        "wandb_project": "neox",
        "wandb_group": "pythia",
        "tensorboard-dir": "tensorboard",
        "log-dir": "logs",
        "save": "checkpoints",
        "init_method": "small_init",
        "output_layer_init_method": "wang_init",
        "init_method_std": 0.01,
        "some_future_key": 1,
    }
    (tmp_path / "p.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **extra)))
    out, notes = import_neox(tmp_path / "p.yml", tmp_path / "out")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["checkpoint"]["keep_last"] == 3
    assert cfg["checkpoint"]["extra_save_steps"] == extra["extra-save-iters"]
    assert cfg["logging"]["wandb"] and cfg["logging"]["wandb_project"] == "neox"
    assert cfg["logging"]["tensorboard"] and cfg["model"]["init_method"] == "neox"
    assert cfg["model"]["init_std"] == 0.01
    text = " | ".join(notes)
    assert f"TensorBoard logs go to {out.absolute()}/tensorboard" in text
    for key in (
        "log_dir: logs",
        "save: checkpoints",
        "wandb_group is not mapped",
        "some_future_key",
    ):
        assert key in text, key
    # without keep-last-n-checkpoints NeoX keeps every checkpoint: the rotation here is noted
    # NeoX's default init (normal + scaled_normal) is ours by name; one we lack is noted
    (tmp_path / "q.yml").write_text(yaml.safe_dump(neox_yaml(corpus)))
    out, notes = import_neox(tmp_path / "q.yml", tmp_path / "out2")
    assert any("GPT-NeoX keeps every checkpoint" in n for n in notes)
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["model"]["init_method"] == "scaled_normal"
    )
    (tmp_path / "r.yml").write_text(yaml.safe_dump(neox_yaml(corpus, init_method="xavier_normal")))
    _, notes = import_neox(tmp_path / "r.yml", tmp_path / "out3")
    assert any("init_method=xavier_normal" in n for n in notes)


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"pos-emb": "alibi"}, "pos_emb cannot be imported: position embedding"),
        ({"USE_BiPE": True}, "BiPE"),
        ({"attention-config": [[["sparse_fixed"], 2]]}, "sparse_fixed"),
        ({"norm": "rmsnorm"}, "norm=rmsnorm, activation=gelu"),
        ({"optimizer": {"type": "Lion"}}, "only AdamW"),
    ],
)
def test_unsupported_neox_options_are_named(corpus, tmp_path, extra, match):
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **extra)))
    with pytest.raises(ConversionError, match=match) as e:
        import_neox(tmp_path / "bad.yml", tmp_path / "out")
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)


def test_checkpoint_that_does_not_match_its_config(corpus, tmp_path):
    from megatron_sep.data.tokenizer import load_tokenizer

    write_neox_checkpoint(
        hf_neox(load_tokenizer(corpus["tokenizer"]).vocab_size), tmp_path / "neox"
    )
    for extra, match in (
        ({"num-layers": 3}, "holds 2 transformer layers, its config 3"),
        ({"hidden-size": 128}, "do not match the config wrong.yml"),
    ):
        (tmp_path / "wrong.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **extra)))
        with pytest.raises(ConversionError, match=match):
            import_neox(tmp_path / "wrong.yml", tmp_path / "out", tmp_path / "neox")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds no GPT-NeoX checkpoint"):
        import_neox(tmp_path / "wrong.yml", tmp_path / "out", tmp_path / "empty")
    (tmp_path / "good.yml").write_text(yaml.safe_dump(neox_yaml(corpus)))
    # into the source checkpoint
    with pytest.raises(ConversionError, match="never done, even with --force"):
        import_neox(tmp_path / "good.yml", tmp_path / "neox", tmp_path / "neox", force=True)
    (tmp_path / "neox" / "global_step10" / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(
        ConversionError, match="layer 3 has tensor-parallel shards \\[0\\], not 0..1"
    ):
        import_neox(tmp_path / "good.yml", tmp_path / "out", tmp_path / "neox")


@pytest.mark.parametrize(
    "extra",
    [
        {"optimizer": "Adam"},
        {"zero_optimization": 1},
        {"rotary-pct": "quarter"},
        {"model-parallel-size": "two"},
        {"split": 0.9},
    ],
)
def test_wrongly_typed_neox_values_are_one_line(corpus, tmp_path, extra):
    (tmp_path / "t.yml").write_text(yaml.safe_dump(neox_yaml(corpus, **extra)))
    with pytest.raises(ConversionError) as e:
        import_neox(tmp_path / "t.yml", tmp_path / "out")
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
