"""`Store`: where checkpoints live, a directory, bucket or container.

The local checkpoint directory and every mirror (`file://`, `s3://`, `gs://`,
`az://`) are stores. One subclass per kind implements the abstract
primitives (`_upload_file`, `_download_file`, `_list`, `_delete`,
`_read_bytes`, `_write_bytes`, `_read_versioned`, `_write_if`,
`_archive_file`, `_probe`, plus `_error_kind` to tell transient failures
apart); everything that decides *what* is transferred and *in which order*
lives here, once, and is tested once for every store (tests/test_stores.py):

- upload: data -> index -> (remote sizes verified) -> manifest; never the
  pointer.
- commit: the `checkpoint` pointer, written last and only for checkpoints
  whose manifest is present, so a reader never sees a checkpoint as latest
  before all its files are there.
- retention: pointer first, then each dropped checkpoint's manifest before
  its data.
- retries: transient failures are retried with exponential backoff and full
  jitter; anything else becomes a `StorageError` that names the URL.
"""

import abc
import dataclasses
import logging
import os
import random
import re
import tempfile
import time
import urllib.parse
import uuid

from keras_ckpt import _args
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import CheckpointNotFoundError
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import KerasCkptError
from keras_ckpt.errors import StorageError
from keras_ckpt.store import options as upload_options_lib

logger = logging.getLogger("keras_ckpt.store")

_KiB = 1024
_MiB = 1024 * 1024
_FILE_RE = manifest_lib.FILE_RE

# What a failure means, as told by `Uploader._error_kind()`.
TRANSIENT = "transient"  # retry: connection reset, timeout, 5xx, throttling
NO_BUCKET = "no_bucket"  # the bucket / container / directory is missing
NO_CREDENTIALS = "no_credentials"  # no credentials could be found
BAD_CREDENTIALS = "bad_credentials"  # credentials were rejected
DENIED = "denied"  # authenticated, but not allowed
NOT_FOUND = "not_found"  # the object is missing
REFUSED = "refused"  # a bucket policy or key permission refused a write


@dataclasses.dataclass(frozen=True)
class UploaderOptions:
    """How an `Uploader` talks to its store. Every `Uploader` takes these.

    Args:
        retries: int, how many times one operation (a file transfer, a
            listing, a small read or write) is retried after a transient
            failure: connection reset, timeout, HTTP 5xx, throttling.
            Defaults to `5`.
        backoff: float, base delay in seconds between retries. Retry `n`
            (from 0) waits a random time in
            `[0, min(max_backoff, backoff * 2**n)]` ("full jitter").
            Defaults to `0.5`.
        max_backoff: float, upper bound in seconds of one delay. Defaults to
            `20.0`.
        timeout: float, seconds to wait to connect or for the next bytes of
            a response before an attempt fails. Defaults to `60.0`.
        request_retries: int, retries of a single HTTP request by the cloud
            SDK itself, inside one attempt (so that one failed part does not
            restart a multipart transfer). Defaults to `2`.
        check_timeout: float, timeout of `check()`, which runs before
            training starts and must fail fast. Defaults to `10.0`.
        max_concurrency: int, parallel connections used to move one large
            file. Defaults to `8`.
        multipart_threshold: int, files of at least this many bytes are sent
            in parts (S3 multipart upload, Azure blocks, GCS resumable
            upload). Defaults to 32 MiB.
        chunk_size: int or None, bytes per part. A multiple of 256 KiB (a
            GCS rule) and at least 5 MiB (an S3 rule). Defaults to None: the
            store's own default, 16 MiB for S3 parts and Azure blocks, and
            100 MiB for GCS, whose resumable uploads take chunks one after
            another (16 MiB chunks made a 1 GB upload 3x slower).

    Example:

    ```python
    options = keras_ckpt.store.UploaderOptions(retries=8, timeout=30)
    uploader = keras_ckpt.get_uploader("s3://my-bucket/run-1", options=options)
    ```
    """

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0
    timeout: float = 60.0
    request_retries: int = 2
    check_timeout: float = 10.0
    max_concurrency: int = 8
    multipart_threshold: int = 32 * _MiB
    chunk_size: int = None

    def __post_init__(self):
        for name in ("retries", "request_retries"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _invalid(name, value, "a non-negative int")
        for name in ("max_concurrency", "multipart_threshold"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _invalid(name, value, "a positive int")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                _invalid(name, value, "a non-negative number of seconds")
        for name in ("timeout", "check_timeout"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                _invalid(name, value, "a positive number of seconds")
        if self.chunk_size is not None and (
            not _is_int(self.chunk_size)
            or self.chunk_size < 5 * _MiB
            or self.chunk_size % (256 * _KiB)
        ):
            _invalid(
                "chunk_size",
                self.chunk_size,
                "a multiple of 262144 (256 KiB) of at least 5242880 (5 MiB)",
            )


_is_int = _args.is_int
_is_number = _args.is_number
_invalid = _args.invalid


class Store(abc.ABC):
    """A place that holds checkpoints, written with the commit protocol.

    The local checkpoint directory is a `LocalStore`; a mirror is built by
    `keras_ckpt.get_uploader(url)`, which picks the subclass for the URL's
    scheme: `s3://bucket/prefix`, `gs://bucket/prefix`,
    `az://container/prefix` or `file:///absolute/path`. The remote layout is
    the local one (`ckpt-<N>.data-*`, `ckpt-<N>.index`, `ckpt-<N>.json`,
    `checkpoint`), and remote writes follow the same commit protocol: data,
    index, manifest, then the `checkpoint` pointer. A checkpoint whose
    upload was interrupted is never named by the pointer and never reported
    as complete.

    To support another store, subclass `Store`, implement the abstract
    primitives (a subclass that lacks one cannot be instantiated: Python's
    `TypeError` names it), override `_error_kind` to tell transient failures
    apart, and register the class with `keras_ckpt.register_uploader()`
    (docs/custom-uploader.md, "Writing a store").

    Args:
        url: str, where checkpoints go, e.g. `"s3://my-bucket/runs/1"`.
        options: `UploaderOptions`, or None to build one from `**kwargs`.
        upload_options: the store's `upload_options_class` instance
            (`S3UploadOptions`, `GCSUploadOptions`, `AzureUploadOptions`), or
            None to build one from `**kwargs`.
        **kwargs: fields of `UploaderOptions` (`retries`, `backoff`,
            `timeout`, `max_concurrency`, ...) and of the store's upload
            options (`ServerSideEncryption`, `kms_key_name`, ...).

    Example:

    ```python
    uploader = keras_ckpt.get_uploader("gs://my-bucket/run-1", retries=8)
    uploader.check()  # fails fast if the bucket or credentials are wrong
    uploader.mirror("./checkpoints", "ckpt-120", keep_names=["ckpt-80", "ckpt-120"])
    uploader.latest_complete()  # "ckpt-120"
    uploader.download_checkpoint("ckpt-120", "/tmp/restore")
    ```
    """

    #: What the store calls a bucket, for error messages.
    bucket_word = "bucket"
    #: The store's frozen dataclass of upload options (encryption, class,
    #: tags; see `upload_options`), or None if it has none.
    upload_options_class = None
    # Part size when `options.chunk_size` is None.
    default_chunk_size = 16 * _MiB
    # Whether `complete_manifests()` keeps manifests' bytes across calls
    # (a remote read is a request; a local one is not).
    cache_manifests = True

    @property
    def chunk_size(self):
        """Bytes per part of a large transfer."""
        return self.options.chunk_size or self.default_chunk_size

    def __init__(self, url, options=None, upload_options=None, **kwargs):
        self.options, self.upload_options = upload_options_lib.resolve(
            type(self), UploaderOptions, options, upload_options, kwargs
        )
        self._manifests = {}  # manifest file -> (size, bytes)
        self._archived = set()  # checkpoints already moved by `archive()`
        self.scheme, self.bucket, self.prefix = self._parse_url(url)
        self.url = self._format_url()

    # ----------------------------------------------------------------------
    # URL handling. Subclasses may override `_parse_url` / `_format_url`.

    def _parse_url(self, url):
        """Returns (scheme, bucket, prefix) of `url`; prefix has no slashes
        at either end."""
        if not isinstance(url, str):
            _invalid("url", url, 'a URL string such as "s3://bucket/prefix"')
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme or not parts.netloc:
            _invalid(
                "url", url, f'a URL of the form "{parts.scheme or "s3"}://'
                f'{self.bucket_word}/prefix"'
            )
        if parts.query or parts.fragment:
            _invalid("url", url, "a URL without ?query or #fragment")
        return parts.scheme.lower(), parts.netloc, parts.path.strip("/")

    def _format_url(self):
        base = f"{self.scheme}://{self.bucket}"
        return f"{base}/{self.prefix}" if self.prefix else base

    def _key(self, name):
        """Object key of `name` (a path relative to the prefix)."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def _url_of(self, name):
        return f"{self.url}/{name}"

    def _checked(self, name):
        """`name` if it is a relative name under the prefix (no `..`, no
        leading `/`, no backslash or control character).

        Every retried file-level operation checks its name here, so a name
        read from the store (a manifest's file list) never reaches another
        prefix, or, for `file://`, another directory.
        """
        return manifest_lib.check_key(name)

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r})"

    # ----------------------------------------------------------------------
    # Primitives: one small store-specific operation each, no retries (the
    # base class retries them), raising the SDK's own exceptions.

    @abc.abstractmethod
    def _upload_file(self, local_path, name, progress=None):
        """Uploads `local_path` to `name`, replacing it. Large files should
        use the SDK's parallel/multipart transfer per `self.options`.
        `progress(n)` is called with byte increments where the SDK allows."""

    @abc.abstractmethod
    def _download_file(self, name, local_path, progress=None):
        """Downloads `name` to `local_path` (overwriting it). Raises
        `FileNotFoundError` if `name` does not exist."""

    @abc.abstractmethod
    def _list(self):
        """Returns `{name: size}` of every object under the prefix, names
        relative to it (with `/` for deeper levels). A missing prefix is
        empty; a missing bucket is an error."""

    @abc.abstractmethod
    def _delete(self, name):
        """Deletes `name`; deleting a missing object is not an error."""

    @abc.abstractmethod
    def _read_bytes(self, name):
        """Returns the content of small object `name`, or None if absent."""

    @abc.abstractmethod
    def _write_bytes(self, name, data, if_absent=False):
        """Writes small object `name`. With `if_absent`, writes only if it
        does not exist yet (atomically where the store supports it) and
        returns False if it existed; returns True otherwise."""

    @abc.abstractmethod
    def _read_versioned(self, name):
        """Returns `(data, version)` of small object `name`, or
        `(None, None)` if absent. `version` is what the store compares in a
        conditional write: an S3 ETag, a GCS generation, an Azure ETag, a
        digest of a local file."""

    @abc.abstractmethod
    def _write_if(self, name, data, version):
        """Writes small object `name` only if its version is still
        `version` (None: only if `name` does not exist), in one atomic
        request. Returns False if the precondition failed."""

    @abc.abstractmethod
    def _archive_file(self, name, storage_class):
        """Moves object `name` to `storage_class` (the store's archive
        option) in place, keeping its encryption, tags and metadata; does
        nothing if it is in that class already."""

    @abc.abstractmethod
    def _probe(self):
        """Cheaply proves the bucket exists and the credentials can list it,
        within `self.options.check_timeout` and without SDK retries."""

    def _error_kind(self, exc):
        """Classifies one exception (not its cause; the base class walks
        the chain): TRANSIENT, NO_BUCKET, NO_CREDENTIALS, BAD_CREDENTIALS,
        DENIED, NOT_FOUND, or None for any other permanent failure.
        Subclasses handle their SDK's exceptions and defer to this for the
        builtin ones."""
        if isinstance(exc, FileNotFoundError):
            return NOT_FOUND
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return TRANSIENT
        if type(exc).__name__ in ("IncompleteRead", "RemoteDisconnected"):
            return TRANSIENT
        return None

    def _hint(self, kind):
        """What to do about a failure of `kind`; subclasses add specifics."""
        if kind == NO_BUCKET:
            return (
                f"The {self.bucket_word} `{self.bucket}` does not exist. "
                f"Create it or correct the mirror URL."
            )
        if kind == NO_CREDENTIALS:
            return "No credentials were found for this store."
        if kind == BAD_CREDENTIALS:
            return (
                "The store rejected the credentials; check that they are "
                "valid and not expired."
            )
        if kind == DENIED:
            return (
                f"Access to the {self.bucket_word} `{self.bucket}` was denied; "
                "the credentials need permission to list, read, write and "
                "delete objects under the prefix."
            )
        if kind == TRANSIENT:
            return (
                "The store kept failing or was unreachable; check the network"
                " and endpoint, or raise the `retries` / `timeout` options."
            )
        return ""

    # ----------------------------------------------------------------------
    # Retries and error translation.

    def _classify(self, exc):
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            kind = self._error_kind(exc)
            if kind is not None:
                return kind
            # s3transfer's RetriesExceededError keeps the cause here.
            last = getattr(exc, "last_exception", None)
            if isinstance(last, BaseException) and id(last) not in seen:
                exc = last
                continue
            exc = exc.__cause__ or exc.__context__
        return None

    def _retrying(self, what, target, fn, *args, retries=None):
        """Calls `fn(*args)`, retrying transient failures.

        `what` ("upload", "list", ...) and `target` (a URL) name the
        operation in the error raised when it finally fails.
        """
        attempts = 1 + (self.options.retries if retries is None else retries)
        started = None
        for attempt in range(attempts):
            try:
                result = fn(*args)
                if started is not None:
                    logger.warning(
                        "keras_ckpt: %s %s succeeded after %d retries (%.1f s)"
                        ".", what, target, attempt,
                        time.monotonic() - started,
                    )
                return result
            except KerasCkptError:
                raise
            except Exception as e:
                kind = self._classify(e)
                if kind == TRANSIENT and attempt + 1 < attempts:
                    cap = min(
                        self.options.max_backoff,
                        self.options.backoff * 2**attempt,
                    )
                    delay = random.uniform(0, cap)
                    if attempt == 0:
                        started = time.monotonic()
                        # One line says what is retried and for how long.
                        logger.warning(
                            "keras_ckpt: %s %s failed (%s); retrying up to %d"
                            " times for up to %.0f s.", what, target,
                            _summary(e), attempts - 1, self._retry_budget(
                                attempts - 1),
                        )
                    else:
                        logger.info(
                            "%s %s failed (%s); retry %d/%d in %.2fs.",
                            what, target, _summary(e), attempt + 1,
                            attempts - 1, delay,
                        )
                    time.sleep(delay)
                    continue
                raise self._error(what, target, e, kind, attempt + 1) from e

    def _retry_budget(self, retries):
        """Longest time `retries` retries take: their backoff delays plus a
        timeout per attempt."""
        delays = sum(
            min(self.options.max_backoff, self.options.backoff * 2**n)
            for n in range(retries)
        )
        return delays + (retries + 1) * self.options.timeout

    def _error(self, what, target, exc, kind, attempts):
        if kind == NOT_FOUND:
            return CheckpointNotFoundError(
                f"Could not {what} {target}: it does not exist."
            )
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        cause = _summary(exc)
        hint = self._hint(kind)
        if hint:
            return StorageError(
                f"Could not {what} {target}{tries}. {hint} (Cause: {cause}.)"
            )
        return StorageError(f"Could not {what} {target}{tries}: {cause}.")

    # ----------------------------------------------------------------------
    # Retried file-level operations (names are relative to the prefix).

    def upload_file(self, local_path, name, progress=None):
        """Uploads one local file to `name` under the prefix.

        Args:
            local_path: str, the file to upload.
            name: str, its name under the prefix, e.g. `"ckpt-3.index"`.
            progress: callable or None, called with byte counts as they
                are sent.
        """
        self._retrying(
            "upload", self._url_of(name), self._upload_file, local_path,
            self._checked(name), progress,
        )

    def download_file(self, name, local_path, progress=None):
        """Downloads `name` to `local_path`.

        Raises `CheckpointNotFoundError` if `name` does not exist.
        """
        self._retrying(
            "download", self._url_of(name), self._download_file,
            self._checked(name), local_path, progress,
        )

    def list_files(self):
        """Returns `{name: size}` of every object under the prefix."""
        return self._retrying("list", self.url, self._list)

    def delete_file(self, name):
        """Deletes `name` under the prefix (no error if it is absent)."""
        self._manifests.pop(name, None)
        self._retrying("delete", self._url_of(name), self._delete,
                       self._checked(name))

    def read_bytes(self, name):
        """Returns the content of the small object `name`, or None."""
        return self._retrying(
            "read", self._url_of(name), self._read_bytes, self._checked(name)
        )

    def write_bytes(self, name, data, if_absent=False):
        """Writes the small object `name`.

        Args:
            name: str, its name under the prefix.
            data: bytes or str (written as UTF-8).
            if_absent: bool, write only if `name` does not exist yet; the
                check and the write are one atomic request on S3, GCS,
                Azure and file://. Defaults to `False`.

        Returns:
            True if written, False if `if_absent` and `name` existed.
        """
        return self._write_checked(
            name, data,
            lambda data: self._write_bytes(name, data, if_absent=if_absent))

    def _write_checked(self, name, data, write):
        """Retries `write(data)` (a conditional write returning False when
        its precondition failed) and tells a lost race from a lost reply."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._checked(name)
        self._manifests.pop(name, None)
        failed = []

        def attempt():
            try:
                return write(data)
            except Exception:
                failed.append(True)
                raise

        written = self._retrying("write", self._url_of(name), attempt)
        if not written and failed:
            # An attempt whose reply was lost may have written it: only a
            # different content means someone else got there first.
            return self.read_bytes(name) == data
        return written

    def read_versioned(self, name):
        """Returns `(data, version)` of the small object `name`, or
        `(None, None)`; see `write_if()`."""
        return self._retrying(
            "read", self._url_of(name), self._read_versioned, name
        )

    def write_if(self, name, data, version):
        """Writes the small object `name` if nobody changed it since it was
        read with version `version` (None: if it does not exist).

        The comparison and the write are one atomic request on S3
        (`If-Match`/`If-None-Match`), GCS (`ifGenerationMatch`), Azure
        (ETags) and file:// (a lock file created with `O_EXCL`).

        Returns:
            True if written; False if someone else changed `name` first.
        """
        return self._write_checked(
            name, data, lambda data: self._write_if(name, data, version))

    # ----------------------------------------------------------------------
    # Shared checkpoint logic.

    def check(self, write=False):
        """Verifies that the store is reachable and the bucket exists.

        Fast by design (short timeout, at most one retry): `Checkpoint` calls
        it before the first training batch.

        Args:
            write: bool, also prove that objects can be written and deleted
                under the prefix, with a small temporary object. Defaults to
                `False`.

        Raises:
            StorageError: naming the URL and what to do (create the bucket,
                set credentials, grant permissions).

        Example:

        ```python
        keras_ckpt.get_uploader("s3://my-bucket/run-1").check()
        ```
        """
        self._retrying(
            "access", self.url, self._probe, retries=min(1, self.options.retries)
        )
        if write:
            name = f".keras_ckpt-check-{uuid.uuid4().hex}"
            self.write_bytes(name, b"")
            self.delete_file(name)

    def reachable(self):
        """Whether the store answers one cheap request now: no retry, no log.

        What a training run that goes on during a mirror outage asks at each
        save before trying the mirror again.
        """
        try:
            self._probe()
        except Exception:
            return False
        return True

    def read_manifest(self, name):
        """Returns the remote `Manifest` of checkpoint `name`.

        Raises:
            CheckpointNotFoundError: the manifest does not exist.
            CorruptCheckpointError: the manifest cannot be parsed.
        """
        _check_name(name)
        url = self._url_of(manifest_lib.manifest_name(name))
        data = self.read_bytes(manifest_lib.manifest_name(name))
        if data is None:
            raise CheckpointNotFoundError(
                f"No checkpoint `{name}` at {self.url}: {url} does not exist."
            )
        return manifest_lib.Manifest.from_json(data, source=url, name=name)

    def read_pointer(self):
        """Returns `(latest_name, names)` from the remote `checkpoint`
        pointer, or `(None, [])` if there is none."""
        data = self.read_bytes(manifest_lib.POINTER_NAME)
        if data is None:
            return None, []
        return manifest_lib.parse_pointer(data.decode("utf-8", "replace"))

    def listing(self):
        """Every checkpoint under the prefix, valid or not, oldest first: a
        list of `manifest.Listed` (see `manifest.list_store`)."""
        return manifest_lib.list_store(
            self.list_files(), self.read_bytes, self.url)

    def list_checkpoints(self):
        """Lists the checkpoints that have a manifest, oldest first.

        Returns:
            A list of `CheckpointInfo` with `url` set and `path` None;
            `complete` is False, with the reason in `problems`, when a file
            the manifest lists is missing or has the wrong size, or the
            manifest is invalid (see docs/manifest.md). The local directory
            (`LocalCheckpoints.list_checkpoints()`) answers in the same
            shape.
        """
        return [
            manifest_lib.CheckpointInfo.from_listed(
                listed, url=self._url_of(listed.name))
            for listed in self.listing()
        ]

    def checksum_problems(self, manifest):
        """What is wrong with the files of checkpoint `manifest` here: each
        file is read back (downloaded one at a time to a temporary
        directory) and its size and checksum compared with the manifest's.
        Empty if every file is intact."""
        problems = []
        with tempfile.TemporaryDirectory(prefix="keras_ckpt-verify-") as tmp:
            for filename, entry in sorted(manifest.files.items()):
                path = manifest_lib.confined(tmp, filename)
                try:
                    self.download_file(filename, path)
                except CheckpointNotFoundError:
                    problems.append(f"{filename} is missing")
                    continue
                problem = _file_problem(path, entry, verify=True)
                if problem:
                    problems.append(f"{filename} {problem}")
                os.remove(path)
        return problems

    def latest_complete(self):
        """Returns the name of the newest complete checkpoint, or None."""
        for info in reversed(self.list_checkpoints()):
            if info.complete:
                return info.name
        return None

    def upload_checkpoint(self, local_dir, name, progress=None, cancel=None):
        """Uploads one committed local checkpoint, manifest last.

        Files are sent data first, then the index; their remote sizes are
        verified, and only then is the manifest written. The pointer is not
        touched (see `commit()`). A checkpoint already mirrored with the same
        manifest is not sent again.

        Args:
            local_dir: str, the local checkpoint directory.
            name: str, the checkpoint, e.g. `"ckpt-120"`.
            progress: callable or None, called with byte counts as they are
                sent.
            cancel: `threading.Event` or None. Once set, the upload stops
                (between files, and between the parts of a large file where
                the store reports them) with `UploadCancelled`, before the
                manifest is written: the checkpoint is not committed there.
                Once every file is sent, the manifest is written anyway.

        Raises:
            UploadCancelled: `cancel` was set.
            CheckpointNotFoundError: `local_dir` has no manifest for `name`.
            CorruptCheckpointError: a local file is missing or truncated.
            StorageError: the upload failed after retries.
        """
        copy_checkpoint(_local_store(local_dir), self, name, upload=True,
                        verify=False, progress=progress, cancel=cancel)

    def commit(self, names, timestamps=None):
        """Writes the remote `checkpoint` pointer naming `names`.

        The pointer is `tf.train.CheckpointManager`'s file: the last name is
        the latest checkpoint. It names only checkpoints that are complete
        there: a name whose manifest is missing or whose files are missing or
        truncated is left out with a warning (and uploaded again by the next
        save that keeps it), so one upload cut short never blocks the
        pointer.

        Args:
            names: list of str, the retained checkpoints, oldest first.
            timestamps: list of float or None, their save times, recorded as
                `all_model_checkpoint_timestamps`.

        Returns:
            The names the pointer now lists.

        Raises:
            StorageError: none of `names` is completely uploaded.
        """
        return self._commit(names, timestamps,
                            {m.name for m in self.complete_manifests()})

    def _commit(self, names, timestamps, complete):
        """`commit()`, given the names complete on the store (`retain()`
        has them from its own listing: the manifests are read once)."""
        names = list(names)
        if not names:
            _invalid("names", names, "at least one checkpoint name")
        for name in names:
            _check_name(name)
        stamps = dict(zip(names, timestamps)) if timestamps else None
        missing = [n for n in names if n not in complete]
        names = [n for n in names if n in complete]
        if not names:
            raise StorageError(
                f"Cannot point {self._url_of(manifest_lib.POINTER_NAME)} at "
                f"{missing}: not completely uploaded to {self.url}. Upload "
                "them with `upload_checkpoint()` first."
            )
        if missing:
            logger.warning(
                "keras_ckpt: %s does not name %s: not completely uploaded to "
                "%s.", self._url_of(manifest_lib.POINTER_NAME), missing,
                self.url,
            )
        self.write_bytes(
            manifest_lib.POINTER_NAME,
            manifest_lib.format_pointer(
                names, [stamps[n] for n in names] if stamps else None),
        )
        return names

    def complete_manifests(self, listing=None):
        """Manifests of the checkpoints complete on the store, oldest first.

        `listing()` restricted to complete checkpoints, with each manifest's
        bytes read once and cached across calls (a committed manifest never
        changes in place: it is deleted before its checkpoint is replaced,
        and a different size means a different manifest).
        """
        sizes = self.list_files() if listing is None else listing
        # A local directory is read from the page cache: no cache here, so
        # a manifest another process rewrote with the same size is seen.
        cache = self._manifests if self.cache_manifests else {}

        def read(filename):
            size, cached = cache.get(filename, (None, None))
            if cached is None or size != sizes.get(filename):
                cached = self.read_bytes(filename)
                if cached is not None:
                    cache[filename] = (sizes.get(filename), cached)
            return cached

        listed = manifest_lib.list_store(sizes, read, self.url)
        for filename in set(cache) - set(sizes):
            del cache[filename]
        return [entry.manifest for entry in listed if entry.complete]

    def delete_checkpoint(self, name, listing=None):
        """Deletes a checkpoint: manifest first, then its files.

        Deleting a checkpoint that does not exist is not an error.

        Args:
            name: str, the checkpoint, e.g. `"ckpt-120"`.
            listing: dict or None, `list_files()` if the caller has it
                (retention deletes many checkpoints after one listing).
        """
        _check_name(name)
        manifest_file = manifest_lib.manifest_name(name)
        if listing is None:
            listing = self.list_files()
        if manifest_file in listing:
            self.delete_file(manifest_file)
        for filename in sorted(listing):
            if filename.startswith(f"{name}.") and filename != manifest_file:
                self.delete_file(filename)

    def retain(self, keep_names, timestamps=None, drop_damaged=True):
        """Points the store at `keep_names` and deletes every other
        checkpoint there: the complete ones retention dropped, and the
        leftovers of interrupted saves or uploads (files without a
        manifest) older than the newest kept checkpoint. A leftover newer
        than that is spared: it may be a save still in flight; a later save
        of that name replaces it.

        The store is listed once, whatever is deleted.

        Args:
            keep_names: list of str, checkpoints to keep, oldest first; the
                last complete one becomes the latest.
            timestamps: list of float or None, see `commit()`.
            drop_damaged: bool, also delete checkpoints whose manifest is
                there but that are not complete (a file missing or
                truncated, an invalid manifest), kept names included. True
                for a mirror, which a save heals from the local directory
                first; False for the local directory and `keras-ckpt
                prune`, which leave a damaged checkpoint for `keras-ckpt
                verify` to show. Defaults to True.

        Returns:
            The names the pointer now lists.
        """
        listing = self.list_files()
        complete = {m.name for m in self.complete_manifests(listing)}
        pointed = self._commit(keep_names, timestamps, complete)
        newest = max(manifest_lib.step_of(n) for n in pointed)
        committed = set(manifest_lib.names_from_listing(listing))
        present = set()
        for filename in listing:
            match = _FILE_RE.match(filename)
            if match:
                present.add(match.group(1))
        for name in sorted(present - set(pointed), key=manifest_lib.step_of):
            if name in complete or (
                name in committed and drop_damaged
            ) or (
                name not in committed
                and manifest_lib.step_of(name) < newest
            ):
                self.delete_checkpoint(name, listing)
        return pointed

    def archive(self, names):
        """Moves archived checkpoints' data and index files to a colder class.

        The class is the store's archive option (`ArchiveStorageClass` on
        S3, `archive_storage_class` on GCS, `archive_blob_tier` on Azure);
        without one this does nothing. Manifests stay in their class, so
        listing and choosing a checkpoint stay immediate. Each checkpoint is
        moved once per process; a file already in the class is left alone.
        Which checkpoints are archives is retention's decision
        (`RetentionPolicy.archives()`: those kept only by
        `keep_every_n_hours`).

        Args:
            names: list of str, the archived checkpoints.

        Returns:
            The names moved by this call.
        """
        target = getattr(self.upload_options, "archive_class", None)
        pending = [n for n in names if n not in self._archived]
        for name in pending:
            _check_name(name)
        if not (target and pending):
            return []
        listing = self.list_files()
        for name in pending:
            manifest_file = manifest_lib.manifest_name(name)
            for filename in sorted(listing):
                if filename.startswith(f"{name}.") and (
                        filename != manifest_file):
                    self._retrying(
                        "archive", self._url_of(filename), self._archive_file,
                        filename, target,
                    )
            self._archived.add(name)
        return pending

    def mirror(self, local_dir, name, keep_names, timestamps=None,
               progress=None, cancel=None, heal=True):
        """Uploads checkpoint `name`, heals the mirror, then applies
        retention.

        The one call a training run makes per save: `upload_checkpoint()`,
        then every other checkpoint of `keep_names` that is missing or
        incomplete on the mirror (an upload cut short by a preemption or an
        outage) is uploaded again from `local_dir`, or, if `local_dir` no
        longer has it, dropped from the mirror with a warning; then
        `retain()`. A failure to heal one checkpoint is logged and never
        blocks the others.

        Args:
            local_dir: str, the local checkpoint directory.
            name: str, the checkpoint just committed locally.
            keep_names: list of str, the checkpoints to keep remotely, oldest
                first, ending with `name`.
            timestamps: list of float or None, see `commit()`.
            progress: callable or None, called with the byte counts of
                `name`'s files as they are sent.
            cancel: `threading.Event` or None, see `upload_checkpoint()`.
            heal: bool, whether to upload again the other checkpoints of
                `keep_names` that the mirror lacks (False on preemption:
                the budget goes to `name`; the next run heals).

        Returns:
            The names the mirror's pointer now lists.
        """
        keep_names = list(keep_names)
        if name not in keep_names:
            _invalid(
                "keep_names", keep_names, f"a list that includes {name!r}"
            )
        self.upload_checkpoint(local_dir, name, progress, cancel)
        complete = {m.name for m in self.complete_manifests()}
        local = {m.name for m in _local_complete(local_dir)}
        for other in keep_names:
            if other in complete or not heal:
                continue
            if other not in local:
                logger.warning(
                    "keras_ckpt: %s is incomplete and %s no longer has it: "
                    "dropped from the mirror.", self._url_of(other),
                    local_dir,
                )
                continue
            try:
                self.upload_checkpoint(local_dir, other)
            except (StorageError, CorruptCheckpointError) as e:
                logger.warning(
                    "keras_ckpt: could not upload %s again (%s); the next "
                    "save retries.", self._url_of(other), e,
                )
            else:
                logger.warning(
                    "keras_ckpt: uploaded %s again: an earlier upload was cut "
                    "short.", self._url_of(other),
                )
        return self.retain(keep_names, timestamps)

    def download_checkpoint(self, name, local_dir, verify=True, progress=None):
        """Downloads checkpoint `name` into `local_dir`, verified.

        Files arrive under temporary names and are renamed into place only
        once all of them have the manifest's sizes (and CRC32C checksums,
        with `verify`); the manifest is written last. On any failure no
        partial file is left behind. Files already in `local_dir` with the
        right size and checksum are reused.

        Args:
            name: str, the checkpoint, e.g. `"ckpt-120"`.
            local_dir: str, created if needed.
            verify: bool, check CRC32C checksums. Defaults to `True`.
            progress: callable or None, called with byte counts.

        Returns:
            The local checkpoint prefix, `<local_dir>/<name>`, as
            `tf.train.Checkpoint.read()` expects.

        Raises:
            CheckpointNotFoundError: no manifest for `name`.
            CorruptCheckpointError: a file is missing, truncated or fails its
                checksum (the message names the file and its URL).
        """
        _check_name(name)
        os.makedirs(local_dir, exist_ok=True)
        copy_checkpoint(self, _local_store(local_dir), name, upload=False,
                        verify=verify, progress=progress)
        return os.path.join(local_dir, name)

    def push(self, local_dir, progress=None):
        """Mirrors every complete checkpoint of a local directory.

        Checkpoints are uploaded oldest first (those already mirrored with
        the same manifest are skipped, so an interrupted push resumes), then
        the pointer is committed with the local pointer's order. Remote
        checkpoints are not deleted; see `retain()`.

        Args:
            local_dir: str, a keras_ckpt (or tf.train.CheckpointManager with
                keras_ckpt manifests) directory.
            progress: callable or None, called with byte counts.

        Returns:
            The names pushed, oldest first.

        Example:

        ```python
        keras_ckpt.get_uploader("s3://my-bucket/run-1").push("./checkpoints")
        ```
        """
        manifests = _local_complete(local_dir)
        if not manifests:
            raise CheckpointNotFoundError(
                f"No complete checkpoint in {local_dir} to push to {self.url}."
            )
        names = [m.name for m in manifests]
        for name in names:
            self.upload_checkpoint(local_dir, name, progress)
        self.commit(names, [m.timestamp for m in manifests])
        return names

    def pull_choice(self, names=None):
        """The manifests of the checkpoints `pull(names=names)` copies,
        oldest first: `names`, or every complete checkpoint the pointer
        lists (all complete ones if it lists none).

        Raises:
            CheckpointNotFoundError: a name is not complete here, or there
                is nothing to pull.
        """
        complete = {listed.name: listed.manifest
                    for listed in self.listing() if listed.complete}
        if names is not None:
            names = list(names)
            absent = [n for n in names if n not in complete]
            if absent:
                raise CheckpointNotFoundError(
                    f"No complete checkpoint {absent} at {self.url}. "
                    f"Complete ones: {list(complete)}."
                )
        else:
            _, pointer_names = self.read_pointer()
            names = [n for n in pointer_names if n in complete] or list(
                complete)
        if not names:
            raise CheckpointNotFoundError(
                f"No complete checkpoint at {self.url} to pull."
            )
        return [complete[n] for n in sorted(set(names),
                                            key=manifest_lib.step_of)]

    def pull(self, local_dir, names=None, verify=True, progress=None):
        """Downloads complete remote checkpoints into a local directory.

        Checkpoints are downloaded oldest first and verified; one already
        present locally with the same manifest is skipped, so an interrupted
        pull resumes. The local `checkpoint` pointer is written last, so
        `tf.train.latest_checkpoint(local_dir)` works afterwards.

        Args:
            local_dir: str, created if needed.
            names: list of str or None, which checkpoints; None means every
                complete one.
            verify: bool, check CRC32C checksums. Defaults to `True`.
            progress: callable or None, called with byte counts.

        Returns:
            The names now present locally, oldest first.

        Example:

        ```python
        keras_ckpt.get_uploader("gs://my-bucket/run-1").pull("/tmp/run-1")
        ```
        """
        names = [m.name for m in self.pull_choice(names)]
        os.makedirs(local_dir, exist_ok=True)
        local = _local_store(local_dir)
        timestamps = [
            copy_checkpoint(self, local, name, upload=False, verify=verify,
                            progress=progress).timestamp
            for name in names
        ]
        local.commit(names, timestamps)
        return names

#: The name of `Store` before the local directory became a store too; a
#: mirror given as `Checkpoint(mirror=...)` is any `Store`.
Uploader = Store


class UploadCancelled(KerasCkptError):
    """An upload stopped because its `cancel` event was set (a newer
    checkpoint supersedes it). The checkpoint is not committed on the
    store: its manifest was not written."""


def _check_cancel(cancel, url):
    if cancel is not None and cancel.is_set():
        raise UploadCancelled(f"The upload of {url} was cancelled.")


def _cancellable(progress, cancel, url):
    """`progress` that raises `UploadCancelled` once `cancel` is set (the
    SDKs call it between the parts of a file)."""

    def report(nbytes):
        _check_cancel(cancel, url)
        if progress is not None:
            progress(nbytes)

    return report


def copy_checkpoint(source, dest, name, upload, verify=True, progress=None,
                    cancel=None):
    """Copies committed checkpoint `name` from store `source` to store
    `dest`, by the commit protocol: the one copy behind upload, download,
    push, pull and healing.

    1. `source`'s manifest is read and validated, and its files must be
       there with the listed sizes.
    2. If `dest` already holds the same manifest with intact files (sizes;
       with `verify`, checksums too), nothing is copied. Otherwise each file
       `dest` lacks is copied, data before index; a file `dest` holds with
       the same content (vouched for by its own manifest, or by its
       checksum on a local disk) is kept.
    3. A download (into a local directory) receives the files under
       temporary names, each checked (size; with `verify`, CRC32C) and
       fsynced, and renamed into place only once all are there, so a failed
       copy leaves an older complete copy intact. An upload goes to a store
       that may have no rename: its older copy is un-committed (manifest
       deleted) before any file is replaced, and the files' sizes there are
       verified after the transfer.
    4. The manifest is written last: the checkpoint is complete in `dest`
       only now. The pointer is not touched.

    Files move through the local disk: an upload sends `source`'s files
    (`source` is a `LocalStore`) with `dest`'s `upload_file`, a download
    fetches them with `source`'s `download_file` into `dest` (a
    `LocalStore`).

    Args:
        source: `Store`, where the checkpoint is complete.
        dest: `Store`, where it goes.
        name: str, the checkpoint, e.g. `"ckpt-120"`.
        upload: bool, True to upload from a local directory (`source`),
            False to download into one (`dest`).
        verify: bool, check the CRC32C checksums of what a local `dest`
            receives (and of what it already holds). Defaults to `True`.
        progress: callable or None, called with byte counts as they move.
        cancel: `threading.Event` or None. Once set, the copy stops between
            files (and between the parts of a large upload) with
            `UploadCancelled`, before the manifest is written; once every
            file is there, the manifest is written anyway.

    Returns:
        The checkpoint's `Manifest`.

    Raises:
        CheckpointNotFoundError: `source` has no manifest for `name`.
        CorruptCheckpointError: a file of `source` is missing, truncated or
            (with `verify`) fails its checksum.
        StorageError: a transfer failed after retries, or `dest` does not
            hold what was sent.
        UploadCancelled: `cancel` was set.
    """
    from keras_ckpt.store.local import LocalStore

    _check_name(name)
    local = source if upload else dest
    if not isinstance(local, LocalStore):
        raise ValueError(
            f"Cannot copy {source.url}/{name} to {dest.url} directly: copy "
            "it to a local directory first, then from there.")
    local_dest = not upload  # received under temporary names, then renamed
    manifest_file = manifest_lib.manifest_name(name)
    where = source._url_of(name)
    manifest_bytes = source.read_bytes(manifest_file)
    if manifest_bytes is None:
        raise CheckpointNotFoundError(
            f"No committed checkpoint `{name}` at {source.url}: "
            f"{source._url_of(manifest_file)} does not exist."
        )
    manifest = manifest_lib.Manifest.from_json(
        manifest_bytes, source=source._url_of(manifest_file), name=name)
    problems = manifest_lib.size_problems(manifest, source.list_files())
    if problems:
        raise CorruptCheckpointError(
            f"Checkpoint {where} is damaged ({'; '.join(problems)}); it was "
            f"not copied to {dest.url}. Restore an earlier checkpoint "
            "instead."
        )

    listing = dest.list_files()
    old = None
    if manifest_file in listing:
        old_bytes = dest.read_bytes(manifest_file)
        if old_bytes == manifest_bytes and not (
            manifest_lib.size_problems(manifest, listing)
            or (verify and local_dest
                and dest.checksum_problems(manifest))
        ):
            return manifest
        try:
            old = manifest_lib.Manifest.from_json(old_bytes or b"")
        except CorruptCheckpointError:
            old = None

    def already_there(filename):
        # Same size alone is not proof (a re-saved step has the same size):
        # the old manifest must vouch for the content, or a local checksum.
        entry = manifest.files[filename]
        if listing.get(filename) != int(entry["size"]):
            return False
        if old is not None and manifest_lib.same_content(
                entry, old.files.get(filename)):
            return True
        return local_dest and verify and not _file_problem(
            dest.local_path(filename), entry, verify=True)

    pending = [f for f in manifest_lib.commit_order(manifest.files)
               if not already_there(f)]
    if not local_dest and manifest_file in listing:
        # Un-commit the other version before its files are overwritten,
        # so no reader mixes the two.
        dest.delete_file(manifest_file)
    if cancel is not None:
        progress = _cancellable(progress, cancel, where)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = {}  # filename -> temporary name in a local dest
    try:
        for filename in pending:
            _check_cancel(cancel, where)
            target = filename
            if local_dest:
                target = staged[filename] = f".{filename}.part-{tag}"
            try:
                if upload:
                    dest.upload_file(source.local_path(filename), target,
                                     progress)
                else:
                    source.download_file(filename, dest.local_path(target),
                                         progress)
            except CheckpointNotFoundError:
                raise CorruptCheckpointError(
                    f"{filename} is missing from {source._url_of(filename)}"
                    f": checkpoint {where} is incomplete. Restore an earlier "
                    "checkpoint instead."
                ) from None
            if local_dest:
                path = dest.local_path(target)
                problem = _file_problem(path, manifest.files[filename],
                                        verify)
                if problem:
                    raise CorruptCheckpointError(
                        f"{filename} copied from {source._url_of(filename)} "
                        f"{problem}: checkpoint {where} is damaged. Restore "
                        "an earlier checkpoint instead."
                    )
                # Durable before it is renamed into place, as local saves.
                manifest_lib.fsync_file(path)
        if local_dest:
            if manifest_file in listing:
                dest.delete_file(manifest_file)  # un-commit the older copy
            for filename, tmp in staged.items():
                os.replace(dest.local_path(tmp), dest.local_path(filename))
            staged.clear()
            manifest_lib.fsync_dir(dest.directory)
        else:
            wrong = manifest_lib.size_problems(manifest, dest.list_files())
            if wrong:
                raise StorageError(
                    f"Copy of checkpoint {where} to {dest.url} did not "
                    f"verify: {'; '.join(wrong)}. The manifest was not "
                    "written, so the checkpoint is not committed there; the "
                    "next save retries."
                )
    finally:
        for tmp in staged.values():
            try:
                os.remove(dest.local_path(tmp))
            except OSError:
                pass
    # Every file is there: committing costs one small write, so a cancel
    # that comes now lets it commit.
    dest.write_bytes(manifest_file, manifest_bytes)
    return manifest


def _local_store(directory):
    from keras_ckpt.store.local import LocalStore

    return LocalStore.of_directory(directory)


def _check_name(name):
    if not isinstance(name, str) or manifest_lib.step_of(name) is None:
        _invalid("name", name, 'a checkpoint name such as "ckpt-120"')


_USERINFO_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"']+@")


def redact(text):
    """`text` with the `user:password@` of every URL in it masked: an
    endpoint URL may carry credentials, and messages and logs never echo
    them."""
    return _USERINFO_RE.sub(r"\1***@", str(text))


def _summary(exc):
    # The first line: SDK messages can go on with a whole XML/JSON reply.
    lines = [line.strip() for line in redact(exc).splitlines()
             if line.strip()]
    text = lines[0].rstrip(".") if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _file_problem(path, entry, verify):
    size = os.path.getsize(path)
    if size != int(entry["size"]):
        return f"has {size} bytes, the manifest says {entry['size']}"
    if verify:
        return manifest_lib.checksum_problem(path, entry)
    return None


def _local_complete(local_dir):
    """Manifests of the complete checkpoints of a local directory, in its
    pointer's order if it names any of them, else oldest first."""
    from keras_ckpt.store.local import LocalStore

    local = LocalStore.of_directory(local_dir)
    if not os.path.isdir(local.directory):
        return []
    complete = {m.name: m for m in local.complete_manifests()}
    _, pointer_names = local.read_pointer()
    ordered = [n for n in dict.fromkeys(pointer_names) if n in complete]
    return [complete[n] for n in (ordered or complete)]
