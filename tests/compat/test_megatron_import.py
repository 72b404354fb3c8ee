"""import-megatron against megatron-core 0.16.1 itself.

A spawned process builds a Megatron-Core GPTModel (Llama shape: RMSNorm, SwiGLU, GQA 4 heads / 2 groups,
RoPE, untied) with megatron-core's own CPU initialisation. It saves it in the `torch_dist` format with
megatron-core's own `dist_checkpointing.save`, and as legacy per-rank files under (tp2) and (pp2): the
documented split of its state dict, SwiGLU's fc1 held per rank as [gate rows; up rows]. It returns the
logits of megatron-core's own forward.

megatron-core's forward and save assume CUDA in four places that do not touch the math, shimmed in that
process only: the rotary table's device (torch.cuda.current_device -> cpu), the default causal mask (passed
explicitly instead), the dropout RNG tracker (dropout is 0), and the save's torch.cuda.synchronize.
Imported logits must equal megatron-core's within 1e-4 (float32, as the other conversion tests).
"""

import argparse
import os

import pytest
import numpy as np
import torch
import yaml

from megatron_sep.convert import ConversionError
from megatron_sep.checkpoint import load_model
from megatron_sep.convert.megatron import config_from_tensors, import_megatron
from megatron_sep.config import load_config

from ..dist_utils import run_distributed

VOCAB, SEQ = 384, 16
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


class Opener:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Runner(Opener):
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def megatron_args(**extra):
    """What Megatron-LM's training loop stores as `args` for this model."""
    args = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=10000,
        add_bias_linear=False,
        add_qkv_bias=False,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
        vocab_size=VOCAB,
        seq_length=SEQ,
        max_position_embeddings=64,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    return argparse.Namespace(**{**args, **extra})


def _mcore(rank, world, out):
    import contextlib
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.transformer_config import TransformerConfig

    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(1, 1)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a: None
    mcore_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
    )
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    ).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced one shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ)[None].expand(2, SEQ), mask)
    step = os.path.join(out, "dist", "iter_0000010")
    os.makedirs(step)
    state = model.sharded_state_dict()
    state["args"], state["iteration"] = megatron_args(), 10
    dist_checkpointing.save(state, step)
    with open(os.path.join(out, "dist", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    # megatron-core's own save outside Megatron-LM's training loop: no args beside the tensors
    bare = os.path.join(out, "bare", "iter_0000010")
    os.makedirs(bare)
    dist_checkpointing.save(model.sharded_state_dict(), bare)
    full = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    dist.destroy_process_group()
    return tokens, logits, full


def write_legacy(full: dict, folder, tp: int, pp: int):
    """Megatron-LM's torch format: iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt, each rank's shards."""
    step = folder / "iter_0000010"
    step.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("10")
    per_stage = 2 // pp
    for p in range(pp):
        for t in range(tp):
            shard = {}
            for k, v in full.items():
                if k.startswith("decoder.layers."):
                    i = int(k.split(".")[2])
                    if not p * per_stage <= i < (p + 1) * per_stage:
                        continue
                    # stage-local
                    k = k.replace(f"decoder.layers.{i}.", f"decoder.layers.{i - p * per_stage}.")
                elif (k.startswith("embedding") and p != 0) or (
                    not k.startswith("embedding") and p != pp - 1
                ):
                    continue
                if "linear_fc1" in k:  # SwiGLU: this rank's gate rows, then its up rows
                    gate, up = v.chunk(2)
                    v = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
                elif "linear_qkv" in k or "word_embeddings" in k or "output_layer" in k:
                    v = v.chunk(tp)[t]
                elif "linear_proj" in k or "linear_fc2" in k:
                    v = v.chunk(tp, dim=1)[t]
                shard[k] = v.clone()
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (step / name).mkdir()
            torch.save(
                {
                    "model": shard,
                    "args": megatron_args(
                        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
                    ),
                    "iteration": 10,
                    "checkpoint_version": 3.0,
                },
                step / name / "model_optim_rng.pt",
            )


@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore")
    tokens, logits, full = run_distributed(_mcore, 1, str(out), timeout=300)[0]
    return out, tokens, logits, full


@pytest.mark.parametrize("layout", ["torch_dist", "tp2", "pp2"])
def test_megatron_checkpoint_gives_megatron_cores_logits(mcore, tmp_path, layout):
    out, tokens, logits, full = mcore
    if layout == "torch_dist":
        src = out / "dist"
    else:
        src = tmp_path / layout
        write_legacy(full, src, tp=2 if layout == "tp2" else 1, pp=2 if layout == "pp2" else 1)
    out, _ = import_megatron(src, tmp_path / "ours")
    ours, cfg = load_model(out)
    assert (cfg.model.num_kv_heads, cfg.model.ffn_size, cfg.model.tie_embeddings) == (2, 128, False)
    with torch.no_grad():
        assert (ours(tokens) - logits).abs().max().item() <= 1e-4
    # config.yaml beside the checkpoint, as import-neox writes it: training with it starts from these
    written = load_config(out / "config.yaml")
    assert written.model == cfg.model and written.train.run_dir == str(out.absolute())


def test_bad_megatron_checkpoints_are_named(mcore, tmp_path):
    _, _, _, full = mcore
    write_legacy(full, tmp_path / "ok", 1, 1)
    ckpt = tmp_path / "ok" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(ckpt, weights_only=False)
    for args, match in (
        (megatron_args(normalization="LayerNorm"), "normalization=LayerNorm"),
        (megatron_args(num_layers=3), "lacks layer 2's"),
        (megatron_args(ffn_hidden_size=96), "do not match its Megatron args"),
        (None, "holds no Megatron args"),
    ):
        torch.save({**state, "args": args}, ckpt)
        with pytest.raises(ConversionError, match=match) as e:
            import_megatron(tmp_path / "ok", tmp_path / "out")
        assert "\n" not in str(e.value)
    with pytest.raises(ConversionError, match="is not a Megatron checkpoint"):
        import_megatron(tmp_path, tmp_path / "out")
    # read without running code: Megatron's enums and numpy's RNG state become inert stand-ins, an open()
    # payload builds nothing, and one naming os.system is refused
    from megatron.core.transformer.enums import AttnBackend

    marker = tmp_path / "ran"
    torch.save(
        {
            **state,
            "args": megatron_args(attention_backend=AttnBackend.auto),
            "rng_state": [{"np_rng_state": np.random.get_state()}],
            "x": Opener(marker),
        },
        ckpt,
    )
    import_megatron(tmp_path / "ok", tmp_path / "inert")
    assert not marker.exists() and (tmp_path / "inert" / "checkpoints" / "latest").is_file()
    torch.save({**state, "x": Runner(marker)}, ckpt)
    with pytest.raises(ConversionError, match="never loaded"):
        import_megatron(tmp_path / "ok", tmp_path / "out")
    assert not marker.exists()
    torch.save({**state, "args": ["not", "a", "namespace"]}, ckpt)
    with pytest.raises(ConversionError, match="are a list, not an argparse Namespace"):
        import_megatron(tmp_path / "ok", tmp_path / "out")
    torch.save(state, ckpt)
    # never written into: the source checkpoint itself, or a folder inside it (not even with --force)
    for out in (tmp_path / "ok", tmp_path / "ok" / "iter_0000010" / "mp_rank_00"):
        with pytest.raises(ConversionError, match="never done, even with --force"):
            import_megatron(tmp_path / "ok", out, force=True)
    (tmp_path / "ok" / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(ConversionError, match="holds 'abc', not an iteration number"):
        import_megatron(tmp_path / "ok", tmp_path / "out")
    dist = tmp_path / "dist" / "iter_0000001"
    dist.mkdir(parents=True)
    (dist / ".metadata").write_bytes(b"")  # an empty (damaged) torch_dist index
    with pytest.raises(ConversionError, match="torch_dist checkpoint .* cannot be read"):
        import_megatron(dist, tmp_path / "out")


def test_dist_checkpoint_without_megatron_args(mcore, tmp_path, capsys):
    """A checkpoint saved by megatron-core's own dist_checkpointing.save, with no Megatron-LM args beside
    it: the shape comes from its tensors plus the head count the user gives (--num-heads, or --config's
    model section, which also gives what the tensors cannot say: rotary_base, norm_eps, ...)."""
    from megatron_sep.cli import main

    out, tokens, logits, _ = mcore
    bare = out / "bare" / "iter_0000010"
    with pytest.raises(ConversionError, match="holds no Megatron args.*Fix: pass --num-heads") as e:
        import_megatron(bare, tmp_path / "none")
    assert "\n" not in str(e.value)
    ours_dir, notes = import_megatron(bare, tmp_path / "flag", num_heads=4)
    ours, cfg = load_model(ours_dir)
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.num_kv_heads, m.ffn_size) == (
        "llama",
        2,
        64,
        2,
        128,
    )
    assert not m.tie_embeddings and m.vocab_size == VOCAB
    with torch.no_grad():
        assert (ours(tokens) - logits).abs().max().item() <= 1e-4
    assert load_config(ours_dir / "config.yaml").model == m
    assert any("rotary_base=10000.0" in n and "defaults" in n for n in notes), notes
    # --config: the model keys the tensors lack, and the other sections
    given = {
        "model": {"num_heads": 4, "rotary_base": 10000.0, "norm_eps": 1e-5, "rotary_pct": 1.0},
        "optim": {"lr": 1e-4},
        "data": {"seq_len": SEQ},
    }
    given["model"]["max_position_embeddings"] = 64
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(given))
    ours_dir, notes = import_megatron(bare, tmp_path / "cfg", config=tmp_path / "c.yaml")
    cfg = load_config(ours_dir / "config.yaml")
    assert cfg.optim.lr == 1e-4 and cfg.model.max_position_embeddings == 64
    assert not any("defaults" in n for n in notes), notes
    # refused in one line, naming what is wrong
    given["model"]["hidden_size"] = 128
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(given))
    for flags, words in (
        (["--num-heads", "3"], "--num-heads 3 does not divide the hidden size 64"),
        (
            ["--config", str(tmp_path / "c.yaml")],
            "model.hidden_size=128, the checkpoint's tensors 64",
        ),
    ):
        argv = ["import-megatron", "--checkpoint", str(bare), "--out", str(tmp_path / "x"), *flags]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err and "Fix:" in err, err
    # a tensor the Llama shape has not (a LayerNorm's bias) is named
    t = {
        "embedding.word_embeddings.weight": torch.zeros(8, 64),
        "decoder.layers.0.input_layernorm.bias": torch.zeros(64),
    }
    with pytest.raises(
        ConversionError, match=r"holds decoder\.layers\.\*\.input_layernorm\.bias, "
    ):
        config_from_tensors(t, 4, {}, (), [])
    argv = ["import-megatron", "--checkpoint", str(bare), "--out", str(tmp_path / "cli")]
    assert main(argv + ["--num-heads", "4"]) == 0
    assert "train with: megatron-sep train -c" in capsys.readouterr().out
