"""One execution of a study at a time, whatever machine it is started from.

Two `run` or `resume` of one study would delete each other's checkpoints and
race on results.parquet. The lock is an object beside the study's state:

- on a local folder, `<study>/.lock` held with flock: the kernel lets go of it
  when its process dies, however it dies, so a killed driver never blocks
  `resume`;
- on S3, `<study>/.lock` created with a conditional write (If-None-Match: *)
  and renewed every `RENEW_EVERY_S` with If-Match on its ETag; a lock not
  renewed for `STALE_AFTER_S` belongs to a dead driver and is taken over, again
  with If-Match, so of two takers only one wins.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from typing import Optional

from orchestrator.storage import Storage
from orchestrator.study import StudyError

LOCK_FILE = ".lock"
RENEW_EVERY_S = 20.0
STALE_AFTER_S = 90.0


class StudyLocked(StudyError):
    """Another execution holds the study (one line, with who and since when)."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "renewed": time.time()}


def _held_by(owner: dict, where: str) -> StudyLocked:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return StudyLocked(f"{where} is held by another execution (pid {owner.get('pid')} on "
                       f"{owner.get('host')}, since {since}): wait for it to end, or stop it first")


class StudyLock:
    """acquire() or raise StudyLocked; release() at the end (also on a clean exit)."""

    def __init__(self, storage: Storage, study: str):
        self.storage, self.rel = storage, f"{study}/{LOCK_FILE}"
        self._file = None  # local: the open, flocked file
        self._etag: Optional[str] = None  # S3: the ETag of our lock object
        self._stop = threading.Event()
        self._owner = _owner()

    def acquire(self) -> "StudyLock":
        if self.storage.is_local:
            self._acquire_local()
        else:
            self._acquire_s3()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._file is not None:
            self._file.close()  # unlocks
            self._file = None
        elif self._etag is not None:
            bucket, key = self._bucket_key()
            try:
                self._s3().delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception:  # gone stale and taken over, or storage away: it expires anyway
                pass
            self._etag = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # -- local folder
    def _acquire_local(self) -> None:
        path = self.storage.path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = _parse(f.read())
            f.close()
            raise _held_by(owner, f"study lock {path}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._owner))
        f.flush()
        self._file = f

    # -- S3
    def _s3(self):
        import boto3

        from trainers.filesystems import s3_endpoint

        return boto3.client("s3", endpoint_url=s3_endpoint())

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.storage.path(self.rel).partition("/")
        return bucket, key

    def _acquire_s3(self) -> None:
        s3, (bucket, key) = self._s3(), self._bucket_key()
        where = f"study lock s3://{bucket}/{key}"
        try:
            self._etag = s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(self._owner).encode(),
                                       IfNoneMatch="*")["ETag"]
        except s3.exceptions.ClientError as e:
            if not _precondition_failed(e):
                raise
            held = s3.get_object(Bucket=bucket, Key=key)
            owner = _parse(held["Body"].read().decode())
            if time.time() - owner.get("renewed", 0) < STALE_AFTER_S:
                raise _held_by(owner, where) from None
            try:  # stale: take it over, unless someone else just did
                self._etag = s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(self._owner).encode(),
                                           IfMatch=held["ETag"])["ETag"]
            except s3.exceptions.ClientError as e2:
                if _precondition_failed(e2):
                    raise _held_by(owner, where) from None
                raise
        threading.Thread(target=self._renew, args=(s3, bucket, key), daemon=True,
                         name="study-lock-renewal").start()

    def _renew(self, s3, bucket: str, key: str) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            self._owner["renewed"] = time.time()
            try:
                self._etag = s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(self._owner).encode(),
                                           IfMatch=self._etag)["ETag"]
            except Exception:  # storage away for a moment: renew at the next tick
                continue


def _precondition_failed(e) -> bool:
    return e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _parse(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}
