"""Preemption: a signal asks a training or evaluation job to save its resumable state and stop.

SLURM sends SIGTERM (preemption) or the ``--signal`` of the job (submitit's default: SIGUSR2, ``advgkl
sweep`` asks for it 120 s before the time limit) before it kills a job; a user may send SIGUSR1. The
handler only records the signal. The training loop checks ``requested`` after every optimiser step and
AutoAttack after every chunk; on a request they write ``last.pt`` / the AutoAttack state and raise
``Preempted``, and the CLI exits with ``PREEMPTED_EXIT`` (75), which ``advgkl sweep`` reads as "requeue".
``--resume`` then continues bitwise where the job stopped.
"""
from __future__ import annotations

import contextlib
import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL of sysexits.h: "try again later"; the sweep requeues on it
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_received: list[str] = []  # names of the signals received while watching, oldest first


class Preempted(BaseException):
    """The job saved its state on a preemption signal and stops; a BaseException like KeyboardInterrupt,
    so that no ``except Exception`` on the way up mistakes it for a failure."""


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextlib.contextmanager
def watch():
    """Record SIGUSR1, SIGUSR2 and SIGTERM inside the block (from the main thread; elsewhere a no-op) and
    restore the previous handlers after it. A request still pending at the end of the block is dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


def requested(world=None) -> str | None:
    """The first preemption signal received (e.g. ``"SIGTERM"``), or None. Under torchrun every rank
    must call it at the same point: a request on any rank stops all of them at the same step."""
    mine = _received[0] if _received else None
    if world is None or world.size == 1:
        return mine
    import torch  # here: a sweep job's wrapper process never needs torch

    if world.any(torch.tensor([mine is not None])).item():  # a CPU tensor: gloo serves it beside NCCL
        return mine or "SIGTERM (on another rank)"
    return None
