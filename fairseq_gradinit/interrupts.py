"""SIGINT/SIGTERM while GradInit runs: end the run at once, leaving no files behind.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is,
and there it can be lost: raised inside a ``__del__`` (fairseq's epoch iterators are
dropped when GradInit starts a new epoch) it is printed as "Exception ignored in ..."
and GradInit goes on. While GradInit computes, nothing has been written yet, so the
handler here ends the process on the spot (exit 128 + signal number, as a shell
reports a killed job). While the JSON and checkpoint are written, a signal is held
until the files are whole, then ends the run the same way.

    with stop_at_once():
        result = ...          # SIGINT ends the process here, nothing written
        with deferred():
            write_files()     # SIGINT waits for the files, then ends the process
"""
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending = []  # signals received inside deferred()
_deferring = [False]


def exit_now(code: int = 0, message: str = None) -> None:
    """End the process at once, from anywhere inside fairseq's training loop.

    A SystemExit or KeyboardInterrupt unwinding through fairseq would shut the
    interpreter down while its batch prefetch thread (a daemon thread of
    BufferedIterator) may be inside torch's C++ code, which then aborts the process
    ("terminate called without an active exception", exit 134). Logs are flushed first,
    and the data-loader workers (children of this process) are ended first: left alone,
    one serving a batch to this process prints a ConnectionResetError traceback.
    """
    for child in multiprocessing.active_children():
        child.kill()
    logging.shutdown()
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop(signum, frame):
    if _deferring[0]:
        _pending.append(signum)
        return
    _end(signum)


def _end(signum):
    name = signal.Signals(signum).name
    exit_now(128 + signum, f"fairseq-gradinit: stopped by {name} during GradInit; no scales or checkpoint written")


@contextlib.contextmanager
def stop_at_once():
    """Inside: SIGINT and SIGTERM end the process (main thread only; elsewhere no-op).

    Outside GradInit fairseq's own handling applies again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal the caller chose to ignore (nohup, a background job) stays ignored.
    previous = {s: signal.signal(s, _stop) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred():
    """Inside ``stop_at_once``: hold signals until the block ends, then act on them."""
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False
        if _pending:
            signum = _pending[0]
            _pending.clear()
            name = signal.Signals(signum).name
            exit_now(128 + signum, f"fairseq-gradinit: stopped by {name} after GradInit wrote its files")
