"""The step line's clock: time of day, elapsed wall time and an ETA from this process's rate so far."""

import re

import pytest

from megatron_sep.training.metrics import format_clock, format_duration, format_step


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (45.4, "45s"),
        (725, "12m05s"),
        (3720, "1h02m"),
        (11400, "3h10m"),
        (183600, "2d03h"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_clock_on_the_step_line_and_eta_shrinks():
    # 1000 steps at 4 s each, 100 done per report: the estimate falls with the steps left
    clocks = [format_clock(0.0, 4.0 * done, done, 1000 - done) for done in (100, 500, 900)]
    etas = [re.search(r"eta (\S+)$", c).group(1) for c in clocks]
    assert etas == ["1h00m", "33m20s", "6m40s"]
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d:\d\d \| elapsed 6m40s \| eta 1h00m", clocks[0])
    # the last step has nothing left: no eta; nothing done yet: no rate to estimate from
    assert clocks[-1].count("|") == 2 and "eta" not in format_clock(0.0, 4000.0, 1000, 0)
    assert "eta" not in format_clock(0.0, 1.0, 0, 10)
    m = {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1e4, "peak_mem_gb": 1.0}
    line = format_step(100, 1000, m, clocks[0])
    assert line.startswith("step    100/1000 | loss 2.0000") and line.endswith(clocks[0])
    assert format_step(100, 1000, m).endswith("mem 1.00 GB")
