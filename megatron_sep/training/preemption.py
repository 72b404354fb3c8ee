"""Stopping a run between steps: SIGTERM / SIGUSR1 (a scheduler's notice) or Ctrl-C stop at the next step
boundary, on every rank, with a save. A second Ctrl-C stops at once, or right after a save in progress."""

from __future__ import annotations

import contextlib
import signal

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self, ctx):
        self.ctx = ctx
        self.signal = None  # the name of the signal that asked to stop
        self.saving, self.interrupt_after_save = False, False

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def during_save(self):
        """A second Ctrl-C inside a save would read as a write error: it stops the run once the save is done."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.interrupt_after_save:
            raise KeyboardInterrupt

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            if self.saving:
                self.interrupt_after_save = True
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.signal = signal.Signals(signum).name

    def stop_agreed(self) -> bool:
        """Ranks get the signal at slightly different times: stop when any rank has it."""
        if self.ctx.world == 1:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=self.ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = "peer signal"
        return bool(flag.item())
