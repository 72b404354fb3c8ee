import subprocess
import sys

import pytest

from megatron_sep.config import ConfigError, config_from_dict, dump_config, load_config


def error(raw, overrides=()):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, overrides)
    return str(e.value)


def test_defaults_valid_and_overrides_apply():
    cfg = config_from_dict({}, ["optim.lr=3e-4", "model.family=neox", "data.split=[1, 0, 0]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.family == "neox" and cfg.data.split == [1.0, 0.0, 0.0]


def test_unknown_key_suggests_closest():
    msg = error({"model": {"num_haeds": 4}})
    assert "model.num_haeds" in msg and "did you mean 'num_heads'" in msg


def test_unknown_section_and_override_key():
    assert "did you mean 'optim'" in error({"optimm": {}})
    assert "did you mean 'lr'" in error({}, ["optim.lrr=1e-3"])


def test_wrong_type():
    msg = error({"train": {"steps": "many"}})
    assert (
        "train.steps" in msg
        and "expected integer" in msg
        and "Fix: give a value of type integer" in msg
    )
    assert "expected boolean" in error({"train": {"compile": 3}})
    assert "expected mapping or null" in error({"parallel": {"deepspeed": 3}})
    assert "one of 'neox', 'llama'" in error({"model": {"family": "gpt2"}})


def test_out_of_range():
    assert "optim.lr" in error({"optim": {"lr": -1}})
    assert "model.hidden_dropout" in error({"model": {"hidden_dropout": 1.5}})
    assert "train.micro_batch_size" in error({"train": {"micro_batch_size": 0}})


def test_inconsistent_values():
    msg = error({"model": {"hidden_size": 256, "num_heads": 3}})
    assert "model.num_heads=3" in msg and "does not divide" in msg and "Fix:" in msg
    assert "data.seq_len=4096" in error(
        {"data": {"seq_len": 4096}, "model": {"max_position_embeddings": 2048}}
    )
    assert "model.num_kv_heads" in error({"model": {"num_heads": 4, "num_kv_heads": 3}})
    assert "global_batch_size" in error({"train": {"micro_batch_size": 4, "global_batch_size": 6}})
    assert "data.weights" in error({"data": {"paths": ["a", "b"], "weights": [1.0]}})
    assert "optim.min_lr" in error({"optim": {"lr": 1e-4, "min_lr": 1e-3}})


def test_yaml_round_trip(tmp_path):
    cfg = config_from_dict({"model": {"num_layers": 3}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_cli_rejects_bad_config_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 100\n  num_heads: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_sep", "train", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.num_heads=3" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_shipped_configs_validate():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(path)
        if "pythia160m" in path.name:  # the paper's hyperparameters
            m, o = cfg.model, cfg.optim
            assert (m.num_layers, m.hidden_size, m.num_heads, m.rotary_pct, cfg.data.seq_len) == (
                12,
                768,
                12,
                0.25,
                2048,
            )
            assert (o.lr, o.min_lr, o.warmup_fraction, o.weight_decay, o.clip_grad) == (
                6e-4,
                6e-5,
                0.01,
                0.1,
                1.0,
            )
    # the demo trains SepLLM
    assert load_config(paths[0].parent / "tiny_cpu.yaml").attention.kind == "sepllm"


def test_check_config_finds_missing_tokenizer_and_data_files(corpus, tmp_path, capsys):
    """--check-config runs the run's own data checks: the tokenizer and each prefix's .bin and .idx exist
    (data.mock needs neither); each refusal is one line naming the key, the path and the fix."""
    from megatron_sep.cli import main

    from ..conftest import tiny_config

    cfg = tiny_config(corpus, tmp_path / "run")
    config = tmp_path / "c.yaml"
    prefix = str(corpus["prefix"])
    cases = [
        (
            ["data.tokenizer=/nowhere/tok.model"],
            "data.tokenizer='/nowhere/tok.model': does not exist",
        ),
        ([f"data.paths=[{prefix}, /nowhere/x]"], "data.paths[1]='/nowhere/x': /nowhere/x.bin and"),
    ]
    for sets, words in cases:
        config.write_text(dump_config(config_from_dict(yaml_of(cfg), sets)))
        assert main(["train", "-c", str(config), "--check-config"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err and "Fix:" in err, err
    mock = ["data.mock=true", "model.vocab_size=64", "data.tokenizer=/nowhere", "data.paths=[]"]
    config.write_text(dump_config(config_from_dict(yaml_of(cfg), mock)))
    assert main(["train", "-c", str(config), "--check-config"]) == 0
    config.write_text(dump_config(cfg))
    assert main(["train", "-c", str(config), "--check-config"]) == 0
    assert not (tmp_path / "run").exists()


def yaml_of(cfg) -> dict:
    import yaml

    return yaml.safe_load(dump_config(cfg))
