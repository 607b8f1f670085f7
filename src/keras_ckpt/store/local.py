"""`LocalStore`: a directory, the local checkpoint directory or a `file://` mirror."""

import contextlib
import errno
import hashlib
import os
import stat
import time
import urllib.parse

from keras_ckpt import _args
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.store import base

_COPY_CHUNK = 8 * 1024 * 1024


class _MissingDirectory(OSError):
    """The directory that holds the mirror directory does not exist."""


class LocalStore(base.Store):
    """A local or mounted directory (`file:///path`) as a store.

    The local checkpoint directory is one (`LocalStore.of_directory()`),
    and so is a `file://` mirror, e.g. on an NFS or other shared mount:
    both are listed, committed, retained and leased by the same code as a
    bucket. Every write is atomic and durable (temporary file, fsync,
    rename), so a crash never leaves a half-written file under its final
    name; the conditional writes use `link()` (create if absent) and an
    `O_EXCL` lock file (compare and swap). Only regular files are listed
    and read, so a FIFO or device node put in the directory cannot hang or
    flood a reader. The directory itself is created on first use, but its
    parent must exist (the parent plays the role of a bucket: a typo in a
    mount path fails instead of silently writing to the local disk).

    Args:
        url: str, `"file:///absolute/path"`.
        **options: see `UploaderOptions`; only `retries` and `backoff`
            matter here.

    Example:

    ```python
    uploader = keras_ckpt.get_uploader("file:///mnt/shared/run-1")
    uploader.mirror("./checkpoints", "ckpt-10", keep_names=["ckpt-10"])
    ```
    """

    bucket_word = "directory"
    cache_manifests = False

    @classmethod
    def of_directory(cls, directory, **options):
        """The store of a local directory path (absolute or relative)."""
        path = os.path.abspath(os.fspath(directory))
        return cls("file://" + urllib.parse.quote(path), **options)

    @property
    def directory(self):
        """The absolute path of the directory."""
        return self.path

    def local_path(self, name):
        """The path of object `name` (checked to stay in the directory)."""
        return self._path(self._checked(name))

    def checksum_problems(self, manifest):
        """`Store.checksum_problems()`, reading the files in place."""
        return manifest_lib.local_problems(self.path, manifest,
                                           checksums=True)

    def _parse_url(self, url):
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if (
            parts is None
            or parts.scheme != "file"
            or parts.netloc not in ("", "localhost")
            or not parts.path.startswith("/")
            or parts.query
            or parts.fragment
            or os.path.normpath(parts.path) == "/"
        ):
            _args.invalid(
                "url", url, 'an absolute file URL such as "file:///data/run-1"'
            )
        self.path = os.path.normpath(urllib.parse.unquote(parts.path))
        return "file", os.path.dirname(self.path), ""

    def _format_url(self):
        return f"file://{self.path}"

    def _path(self, name):
        return os.path.join(self.path, *name.split("/"))

    def _require_parent(self):
        if not os.path.isdir(self.bucket):
            raise _MissingDirectory(
                errno.ENOENT, "No such directory", self.bucket
            )

    def _ensure_dir(self, directory):
        if not os.path.isdir(self.path):
            self._require_parent()
            try:
                os.mkdir(self.path)
            except FileExistsError:
                pass
        os.makedirs(directory, exist_ok=True)

    def _upload_file(self, local_path, name, progress=None):
        dest = self._path(name)
        self._ensure_dir(os.path.dirname(dest))
        tmp = _tmp_name(dest)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                _copy(src, dst, progress)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, dest)
        except BaseException:
            _remove_quietly(tmp)
            raise
        manifest_lib.fsync_dir(os.path.dirname(dest))

    def _download_file(self, name, local_path, progress=None):
        try:
            src = open(self._path(name), "rb")
        except FileNotFoundError:
            self._require_parent()
            raise
        with src, open(local_path, "wb") as dst:
            _copy(src, dst, progress)

    def _list(self):
        if not os.path.isdir(self.path):
            self._require_parent()
            return {}
        listing = {}
        pending = [(self.path, "")]
        while pending:
            directory, rel = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while listing
            for entry in entries:
                name = f"{rel}{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, name + "/"))
                    elif entry.is_file():
                        listing[name] = entry.stat().st_size
                except OSError:
                    continue  # vanished or unreadable: not a checkpoint's
        return listing

    def _delete(self, name):
        _remove_quietly(self._path(name))

    def _read_bytes(self, name):
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer.
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self._require_parent()
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # not a regular file: no object of ours
            return f.read()

    def _write_bytes(self, name, data, if_absent=False):
        dest = self._path(name)
        self._ensure_dir(os.path.dirname(dest))
        return manifest_lib.atomic_write(dest, data, replace=not if_absent)

    def _read_versioned(self, name):
        data = self._read_bytes(name)
        return (None, None) if data is None else (data, _version(data))

    def _write_if(self, name, data, version):
        dest = self._path(name)
        self._ensure_dir(os.path.dirname(dest))
        # rename() alone cannot compare-and-swap: the read, the comparison
        # and the rename happen under a lock file created with O_EXCL.
        with _exclusive(dest + ".lock"):
            try:
                with open(dest, "rb") as f:
                    current = _version(f.read())
            except FileNotFoundError:
                current = None
            if current != version:
                return False
            manifest_lib.atomic_write(dest, data)
        manifest_lib.fsync_dir(os.path.dirname(dest))
        return True

    def _archive_file(self, name, storage_class):
        # A directory has one storage class: nothing to move. (No upload
        # options, so `archive()` never asks.)
        return None

    def _probe(self):
        self._require_parent()
        if os.path.exists(self.path):
            os.listdir(self.path)  # raises if not a readable directory
        elif not os.access(self.bucket, os.W_OK | os.X_OK):
            raise PermissionError(
                errno.EACCES, "Cannot create the mirror directory", self.path
            )

    def _error_kind(self, exc):
        if isinstance(exc, _MissingDirectory):
            return base.NO_BUCKET
        if isinstance(exc, PermissionError):
            return base.DENIED
        return super()._error_kind(exc)

    def _hint(self, kind):
        if kind == base.DENIED:
            return (
                f"This process may not read or write {self.path}; fix the "
                "directory's permissions or choose another mirror URL."
            )
        if kind == base.NO_BUCKET:
            return (
                f"The directory {self.bucket} does not exist: mount or create "
                f"it, or correct the mirror URL {self.url}."
            )
        return super()._hint(kind)


# A lock file older than this was left by a process that died holding it.
_STALE_LOCK_SECONDS = 30.0
_LOCK_WAIT_SECONDS = 10.0


def _version(data):
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path):
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                age = time.time() - os.path.getmtime(lock_path)
            except FileNotFoundError:
                continue
            # A future mtime (another host's clock, or a crafted file) is
            # as stale as an old one: `age` is never trusted to grow.
            if abs(age) > _STALE_LOCK_SECONDS:
                _remove_quietly(lock_path)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{lock_path} is held by another process") from None
            time.sleep(0.01)
    try:
        os.close(fd)
        yield
    finally:
        _remove_quietly(lock_path)


def _tmp_name(path):
    return f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"


def _copy(src, dst, progress):
    while True:
        chunk = src.read(_COPY_CHUNK)
        if not chunk:
            return
        dst.write(chunk)
        if progress is not None:
            progress(len(chunk))


def _remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
