"""Stops a study whose storage no longer takes writes: full, over its quota,
read-only, or closed to this user.

Every trial writes its checkpoints to the study's storage. On a full disk each
trial would fail, be retried by Train and then by Tune, and end `failed`, one
after another through the whole grid. StorageGuard writes a probe beside the
study's state every `every_s` seconds, on a thread of its own (an S3 outage
stalls the probe, never Tune's loop), and reads the error of every trial that
fails. When either shows storage refusing writes, it ends the study at once,
the way a killed driver ends: what is in storage stays as it was last written
whole (see local_fs.py), and `resume` continues the study once storage takes
writes again.
"""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from orchestrator.storage import Storage, StorageRefused

PROBE_EVERY_S = 5.0
# what each refusal says of storage
REFUSALS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EROFS: "is read-only",
            errno.EACCES: "refuses writes", errno.EPERM: "refuses writes"}
# refusals that, in a trial's error, can only be storage's (a permission error could be anything's)
_NAMED_IN_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class StorageGuard(Callback):
    def __init__(self, storage: Storage, study: str, every_s: float = PROBE_EVERY_S):
        self.storage, self.study, self.every_s = storage, study, every_s
        self.refused: Optional[StorageRefused] = None
        self._stop = threading.Event()

    def __getstate__(self):
        return {}  # see TrialRecorder.__getstate__

    def setup(self, **info):
        threading.Thread(target=self._probe_every, name="storage-guard", daemon=True).start()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._read_error(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._read_error(trial)

    def on_step_end(self, iteration, trials, **info):
        # Raised here, out of Tune's loop, which then stops its trials without
        # saving its state again: a resume finds them as they were.
        if self.refused is not None:
            raise self.refused

    def on_experiment_end(self, trials, **info):
        self._stop.set()

    def check(self) -> None:
        """Probe now; raise if storage refuses writes (once Tune's loop is over,
        before the study's last writes)."""
        self._probe()
        if self.refused is not None:
            raise self.refused

    def _probe_every(self) -> None:
        while not self._stop.wait(self.every_s) and self.refused is None:
            self._probe()

    def _probe(self) -> None:
        try:
            self.storage.probe(self.study)
        except OSError as e:  # anything else, an S3 outage say, is for the outboxes to wait out
            if e.errno in REFUSALS:
                self._refuse(REFUSALS[e.errno], _first_line(str(e)))

    def _read_error(self, trial) -> None:
        """A trial failed: did it fail on a write that storage refused?"""
        path = trial.error_file  # the failures Tune wrote down, on this machine
        text = Path(path).read_text(errors="replace") if path and os.path.exists(path) else ""
        for line in text.splitlines():
            for code in _NAMED_IN_ERRORS:
                if os.strerror(code) in line:
                    self._refuse(REFUSALS[code], f"trial {trial.trial_id} failed: {_first_line(line.strip())}")
                    return

    def _refuse(self, what: str, detail: str) -> None:
        if self.refused is None:
            self.refused = StorageRefused(
                f"storage {self.storage.uri} {what} ({detail}): the study stopped, its checkpoints and results "
                f"as they were last written whole; once storage takes writes again, `resume {self.study}` "
                f"continues it")


def _first_line(text: str) -> str:
    return text.splitlines()[0][:200] if text else ""
