"""The next steps' micro-batches, read on a thread while this step computes (data.prefetch).

A step's batches are a pure function of its first sample index (the consumed count), so what the thread
builds is keyed by it: a resume or any jump asks for a key not built ahead, which is then built in the
step as without prefetch. The thread does the host work only (reading samples, stacking, pinning on
CUDA); the copy to the device and the attention plan stay on the main thread and its stream."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Prefetcher:
    def __init__(self, build: Callable[[int], object], depth: int):
        self.build, self.depth = build, depth
        self.pool: ThreadPoolExecutor | None = None  # started by the first get, again after close
        self.pending: dict[int, Future] = {}
        self.hits = 0  # keys served from the thread (tests check the thread did the work)

    def get(self, key: int, ahead: list[int]):
        """build(key), taken from the thread if it was built ahead; then the thread starts on `ahead`
        (at most depth keys). An error of a build ahead is raised here, by the step that needs it."""
        if not self.depth:
            return self.build(key)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        done = self.pending.pop(key, None)
        ahead = ahead[: self.depth]
        for k in [k for k in self.pending if k not in ahead]:  # stale: not wanted any more
            self.pending.pop(k).cancel()
        for k in ahead:
            if k not in self.pending:
                self.pending[k] = self.pool.submit(self.build, k)
        if done is None:
            return self.build(key)
        self.hits += 1
        return done.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}
