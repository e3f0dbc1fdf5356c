"""Ctrl-C during a compile: `kiln: interrupted`, exit 130, whatever TVM was doing."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading


def interruptible(fn):
    """Ctrl-C anywhere in a compile ends it as KeyboardInterrupt (`kiln: interrupted`,
    exit 130). TVM turns an interrupt that lands inside one of its calls (codegen,
    a Python pass called from C++) into an ordinary error, which would otherwise
    read as `codegen ... failed: RuntimeError`: a SIGINT seen while the compile ran
    wins over whatever error came out of it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)  # signal handlers belong to the main thread
        seen = threading.Event()
        prev = signal.getsignal(signal.SIGINT)
        saved_stderr = []

        def on_sigint(signum, frame):
            if prev == signal.SIG_IGN:
                return
            if not seen.is_set():
                # what TVM prints while its objects unwind ("BlockBuilder destroyed with
                # remaining blocks!") means nothing to someone who pressed Ctrl-C
                with contextlib.suppress(OSError):
                    sys.stderr.flush()
                    saved_stderr.append(os.dup(2))
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                    os.close(devnull)
            seen.set()
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if seen.is_set():
                raise KeyboardInterrupt from err
            raise
        finally:
            signal.signal(signal.SIGINT, prev)
            for fd in saved_stderr:
                os.dup2(fd, 2)
                os.close(fd)

    return wrapper
