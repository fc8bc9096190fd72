"""A run stopped by a signal (SIGTERM from SLURM, Kubernetes or `timeout`; SIGINT from Ctrl+C) ends with the
shell's code for that signal (143, 130), a line saying it was stopped and how to resume it, and no leaderboard row.

Lightning's own handling does not do that: during ``fit`` it turns SIGTERM into ``SIGTERMException``, a
``SystemExit`` without a code (the process exits 0, as if the run had finished), and Ctrl+C into ``sys.exit(1)``
(the code this suite keeps for its own bugs). :func:`stop_signals_raise` installs handlers, for the duration of a
run, that raise :class:`RunStopped` instead. Lightning keeps calling a SIGTERM handler it finds installed (after
its own, which tells the DDP ranks it launched), and passes any exception but ``KeyboardInterrupt`` up after its
clean-up, so the exception reaches the run, which adds the run folder, and the CLI, which prints it. A signal that lands in a
finalizer (``__del__``), where Python would print and drop the exception, is only recorded: the run checks
:func:`stop_received` at every batch, after training and before it writes its rows.

``RunStopped`` derives from ``BaseException`` so that no ``except Exception`` on the way (the run's "record a failed
row" branch) takes it for a failure of the run.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(BaseException):
    """The run was stopped by ``signum``; ``detail`` says what became of its folder and how to resume it."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal

    @property
    def message(self) -> str:
        text = f"stopped by {signal.Signals(self.signum).name}"
        return f"{text}: {self.detail}" if self.detail else text


_received: list[int] = []


def stop_received() -> int | None:
    """The stop signal this process received during the current run, if any (a loader worker killed by the
    same signal can surface first as a RuntimeError: that is a stop too, not a failure)."""
    return _received[0] if _received else None


def raise_if_stopped(cause: BaseException | None = None) -> None:
    """Raise :class:`RunStopped` (from ``cause``) if a stop signal was recorded during the current run."""
    signum = stop_received()
    if signum is None:
        return
    if cause is None:
        raise RunStopped(signum)
    raise RunStopped(signum) from cause


def _inside_a_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise_stop(signum, frame) -> None:
    if os.getpid() != _owner_pid:  # a forked DataLoader worker inherited this handler: just end
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _received:  # a repeated signal (Ctrl+C twice, a group kill) must not break the clean-up of the first
        return
    _received.append(signum)
    # The same group signal ends the loader workers, and PyTorch's SIGCHLD handler would report each as a failure
    # (RuntimeError) wherever the run is at that moment, even after it has ended; from here on they are expected.
    # Not restored: the workers of a stopped run may still end while the process exits.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if _inside_a_finalizer(frame):
        # Python would print the exception as "ignored" and drop it (a DataLoader iterator's __del__ joins its
        # workers for a while); the run raises it at its next check instead (stop_received()).
        return
    raise RunStopped(signum)


_owner_pid = os.getpid()


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """During the block, SIGTERM and SIGINT raise :class:`RunStopped` (main thread only; elsewhere nothing changes)."""
    global _owner_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner_pid = os.getpid()
    _received.clear()
    previous = {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
