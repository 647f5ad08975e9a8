"""What a pickle would run, read without running it.

Tune keeps part of its saved state as pickles (the CLOUDPICKLE_FALLBACK values
of its experiment state, its search generator's and callbacks' state files),
and a resume unpickles them: anyone able to write the study's storage could
have the head node run their code. `calls_in` unpickles with every global the
pickle names replaced by an inert stand-in, so nothing of it runs, and says
which globals it names and which of them it calls. A resume goes on only when
Tune's state calls no more than what Tune itself writes there (TUNE_CALLS).
"""
from __future__ import annotations

import io
import pickle

Ref = tuple[str, str]  # (module, qualified name)

# What Tune 2.60's saved state calls as it loads (a local and an S3 study's
# storage context, its syncer and checkpoint manager, the experiment's configs)
# and what it only names (a function kept as an attribute, never called).
TUNE_CALLS: frozenset[Ref] = frozenset({
    ("collections", "deque"),
    ("orchestrator.local_fs", "WholeFileHandler"),
    ("pyarrow._fs", "FileSystem._from_uri"),
    ("pyarrow._fs", "PyFileSystem"),
    ("pyarrow._s3fs", "S3FileSystem._reconstruct"),
    ("ray.train._internal.checkpoint_manager", "_CheckpointManager"),
    ("ray.train._internal.storage", "StorageContext"),
    ("ray.train._internal.storage", "_FilesystemSyncer"),
    ("ray.tune", "CheckpointConfig"),
    ("ray.tune.experiment.experiment", "Experiment"),
    ("ray.tune.stopper.noop", "NoopStopper"),
    ("ray.tune.syncer", "SyncConfig"),
})
TUNE_NAMES: frozenset[Ref] = TUNE_CALLS | {("ray.train._internal.storage", "_upload_to_fs_path")}


class _Inert:
    """Takes whatever the pickle hands it and keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass


def calls_in(data: bytes) -> tuple[set[Ref], set[Ref]]:
    """(globals the pickle names, globals it calls). Raises pickle.UnpicklingError
    (or ValueError, EOFError) on a pickle that is not whole."""
    named: set[Ref] = set()
    called: set[Ref] = set()

    def stand_in(ref: Ref) -> type:
        def new(cls, *args, **kwargs):  # REDUCE, NEWOBJ and NEWOBJ_EX all come here
            called.add(ref)
            return object.__new__(cls)
        return type(ref[1].rpartition(".")[2] or "global", (_Inert,), {"__new__": new})

    class Scan(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            named.add((module, name))
            return stand_in((module, name))

    Scan(io.BytesIO(data)).load()
    return named, called


def unexpected(data: bytes, calls: frozenset[Ref] = TUNE_CALLS, names: frozenset[Ref] = TUNE_NAMES) -> list[str]:
    """The globals a pickle calls or names beyond what is expected, as module.name."""
    named, called = calls_in(data)
    return sorted(f"{m}.{n}" for m, n in (called - calls) | (named - names))
