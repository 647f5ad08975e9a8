"""A local folder that never holds a half-written file, for Ray and for our own writes.

Ray Tune and Train write their state in place: Tune's experiment state (what
`resume` continues from), Train's checkpoint manager snapshot (which
checkpoint a restarted trial loads), each checkpoint's files. On a disk that
fills up mid-write, an in-place write truncates the file first and then fails:
the study could no longer be resumed, or a trial would lose its checkpoints.
Here each file is written to a temporary sibling and moved into place only
once it was written whole; a failed write removes its temporary file and
leaves the old file as it was. (An object store upload is whole already.)
"""
from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs


class _WholeFile:
    """What pyarrow writes through (pa.PythonFile): a temporary sibling of
    `path`, moved onto it by close(). A failed write removes the temporary file
    at once (pyarrow's copy_files drops a stream whose write failed without
    closing it, and the error it keeps would keep the stream alive), and so
    does a stream dropped without close."""

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.tmp-{uuid.uuid4().hex}"
        self.file = open(self.tmp, "wb")

    @property
    def closed(self) -> bool:
        return self.file.closed

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except BaseException:
            self._discard()
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except BaseException:
            self._discard()
            raise

    def close(self) -> None:
        if self.file.closed:
            return
        try:
            self.file.close()  # a full disk may refuse the buffered tail only now
            os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def __del__(self):
        if hasattr(self, "file") and not self.file.closed:  # no file: it could not be created
            self._discard()

    def _discard(self) -> None:
        """Close and remove the temporary file, if that was not done yet."""
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass  # nothing of it is kept
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class WholeFileHandler(pafs.FileSystemHandler):
    """pyarrow's LocalFileSystem, with every file written whole or not at all."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other):
        return isinstance(other, WholeFileHandler)

    def __ne__(self, other):
        return not isinstance(other, WholeFileHandler)

    def get_type_name(self) -> str:
        return "local-whole-files"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of /")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as out:
            while chunk := source.read(1 << 24):
                out.write(chunk)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_WholeFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)  # nothing in a study appends to storage


def whole_file_local_fs() -> pafs.FileSystem:
    return pafs.PyFileSystem(WholeFileHandler())
