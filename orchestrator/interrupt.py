"""Tells a study stopped by Ctrl-C from one that ended.

On SIGINT, Tune saves its state and returns from `fit()` as if the study were
over (it logs a warning, nothing else). Its handler is installed when `fit()`
starts; this callback wraps it once Tune's callbacks are set up, which comes
after, and notes the signal.
"""
from __future__ import annotations

import signal
import threading

from ray.tune import Callback


class InterruptWatch(Callback):
    def __init__(self):
        self.interrupted = False

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; a resumed study attaches fresh ones.
        return {"interrupted": False}

    def setup(self, **info):
        tune_handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(tune_handler):
            return

        def on_sigint(sig, frame):
            self.interrupted = True
            tune_handler(sig, frame)  # Tune's: save state, stop, and put back the handler from before fit()

        signal.signal(signal.SIGINT, on_sigint)
