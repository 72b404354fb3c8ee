"""The paper's Figure 1 numbers from a sweep's metrics: FLOPs and seconds per validation point, the compute
to reach the reference's final loss, and both ratios, on logs whose answers are worked out by hand."""

import math
import random

import pytest

from megatron_sep.experiments import figure1


def logs(steps, per_step, tps, flops_per_token, losses, log_every=10):
    train = [
        {"step": s, "tokens_per_s": tps, "flops_per_token": flops_per_token}
        for s in range(log_every, steps + 1, log_every)
    ]
    val = [{"step": s, "val_loss": v} for s, v in losses]
    return train, val


def test_curve_counts_flops_and_seconds_per_interval():
    rng = random.Random(0)
    per_step, tps, fpt = rng.randint(100, 1000), rng.uniform(1e3, 1e5), rng.uniform(1e6, 1e9)
    train, val = logs(100, per_step, tps, fpt, [(50, 3.0), (100, 2.5), (55, 2.9)])
    # a resume's repeat: ignored
    train.insert(3, {"step": 20, "tokens_per_s": 1.0, "flops_per_token": 1.0})
    train[0]["tokens_per_s"] = tps / 50  # compilation: counted at the steady speed
    c = figure1.compute_curve(train, val, per_step)
    for p, step in zip(c, (50, 100, 55)):
        assert p["flops"] == pytest.approx(step * per_step * fpt, rel=1e-12)
        assert p["seconds"] == pytest.approx(step * per_step / tps, rel=1e-12)


def test_reach_interpolates_and_ratios_follow():
    per_step = 1000
    # reference: 2 units of FLOPs per token, ends at loss 2.0 after 100 steps
    ref_train, ref_val = logs(100, per_step, 1e4, 2.0, [(50, 3.0), (100, 2.0)])
    # the run: 1 FLOP per token and twice as fast; reaches 2.0 between steps 50 (2.4) and 100 (1.6): at step 75
    run_train, run_val = logs(100, per_step, 2e4, 1.0, [(50, 2.4), (100, 1.6)])
    rows = [
        {"run": "vanilla", "curve": figure1.compute_curve(ref_train, ref_val, per_step)},
        {"run": "sep", "curve": figure1.compute_curve(run_train, run_val, per_step)},
    ]
    t = figure1.ratios(rows, "vanilla")["sep"]
    assert t["flops_to_reference_loss"] == pytest.approx(75 * per_step * 1.0)
    assert t["reference_flops_over_run_flops"] == pytest.approx(200 * per_step / (75 * per_step))
    assert t["reference_seconds_over_run_seconds"] == pytest.approx(
        (100 * per_step / 1e4) / (75 * per_step / 2e4)
    )
    # the reference never reaches the run's final 1.6: no paper-form ratio, said as such
    assert t["paper_form_flops"] is None
    assert "not reached" in figure1.describe(rows, "vanilla", {"sep": t})[-1]
    # the other way round: a worse run never reaches the reference's loss
    back = figure1.ratios([rows[1] | {"run": "vanilla"}, rows[0] | {"run": "dense2"}], "vanilla")[
        "dense2"
    ]
    assert back["flops_to_reference_loss"] is None and back["paper_form_flops"] is not None
    assert math.isfinite(back["paper_form_flops"])
