"""The trainer's prefetch thread (training/prefetch.py): keyed builds, errors raised by the step that
needs the batch, stale keys dropped."""

import threading

import pytest

from megatron_sep.training.prefetch import Prefetcher


def test_builds_ahead_on_a_thread_and_falls_back_for_other_keys():
    threads = {}

    def build(k):
        threads[k] = threading.current_thread().name
        return k * 10

    p = Prefetcher(build, depth=2)
    assert p.get(0, [1, 2]) == 0 and threads[0] == threading.current_thread().name
    assert p.get(1, [2, 3]) == 10 and threads[1].startswith("prefetch")
    # a jump (a resume): built in the step, 2 and 3 dropped
    assert p.get(7, [8]) == 70 and p.hits == 1
    assert p.get(8, []) == 80 and p.hits == 2
    p.close()
    assert p.pool is None and not p.pending
    # a closed one starts again
    assert p.get(9, [10]) == 90 and p.get(10, []) == 100 and p.hits == 3
    p.close()


def test_an_error_ahead_is_raised_by_the_step_that_needs_it():
    def build(k):
        if k == 2:
            raise ValueError("bad sample 2")
        return k

    p = Prefetcher(build, depth=1)
    assert p.get(1, [2]) == 1  # the thread's failure is not this step's
    with pytest.raises(ValueError, match="bad sample 2"):
        p.get(2, [3])
    p.close()


def test_depth_zero_starts_no_thread():
    p = Prefetcher(lambda k: k, depth=0)
    assert p.pool is None and p.get(3, [4]) == 3 and not p.pending
