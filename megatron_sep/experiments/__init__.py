"""Experiments over many runs: `megatron-sep sweep` (sweep.py) and its report (report.py)."""
