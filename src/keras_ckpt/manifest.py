"""Checkpoint manifests, the `checkpoint` pointer file, and `CheckpointInfo`.

A checkpoint `ckpt-<N>` is the TensorFlow pair `ckpt-<N>.data-00000-of-00001`
and `ckpt-<N>.index` plus the manifest `ckpt-<N>.json`, the commit record:
it lists every file with its size and CRC32C checksum, the training position, the
metrics at save time and metadata. A checkpoint is *complete* iff its manifest
exists, passes the schema (`Manifest.from_json`, docs/manifest.md) and every
file it lists exists with the listed size; a manifest that fails the schema
makes its checkpoint *invalid*.

Everything read from a store is untrusted. This module is the one place that
validates it, without TensorFlow: `list_store()` lists any directory or
prefix, `confined()` / `check_key()` keep every name inside it, and
`parse_pointer()` keeps only checkpoint names.

The `checkpoint` pointer file keeps `tf.train.CheckpointManager`'s text format
(relative paths), so `tf.train.latest_checkpoint()` and
`tf.train.CheckpointManager` read a keras_ckpt directory as their own.
"""

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any

from keras_ckpt import _args
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import InvalidManifestError

MANIFEST_FORMAT = "keras_ckpt/1"
POINTER_NAME = "checkpoint"
# Canonical names only: ASCII digits, no sign, no leading zero, no
# whitespace (`\Z`, not `$`, which also matches before a newline).
_NAME_RE = re.compile(r"ckpt-(0|[1-9][0-9]{0,18})\Z")
_MANIFEST_RE = re.compile(r"(ckpt-(?:0|[1-9][0-9]{0,18}))\.json\Z")
#: Matches a file of a checkpoint (`ckpt-12.index`, ...); group 1 is its
#: canonical name, so names found by it sort by `step_of`.
FILE_RE = re.compile(r"(ckpt-(?:0|[1-9][0-9]{0,18}))\.")
_DATA_RE = re.compile(r"\.data-[0-9]{5}-of-[0-9]{5}\Z")
_HEX_RE = re.compile(r"[0-9a-f]+\Z")
# Steps, epochs, batches and sizes fit in TensorFlow's int64.
MAX_INT = 2**63 - 1
# Timestamps `datetime` shows in any time zone: before the year 3000.
_MAX_TIMESTAMP = 32503680000.0
_HASH_CHUNK = 8 * 1024 * 1024


def checkpoint_name(step):
    """Returns the checkpoint name for a global step, e.g. `ckpt-120`."""
    return f"ckpt-{int(step)}"


def step_of(name):
    """Returns the step of a checkpoint name (`ckpt-<N>`), or None.

    Only canonical names count: `ckpt-` and the decimal step without sign,
    whitespace or leading zeros, below 2**63.
    """
    if not isinstance(name, str):
        return None
    match = _NAME_RE.match(name)
    if not match:
        return None
    step = int(match.group(1))
    return step if step <= MAX_INT else None


def is_checkpoint_file(name, filename):
    """Whether `filename` is one of checkpoint `name`'s own data or index
    files (`<name>.index`, `<name>.data-00000-of-00001`)."""
    if not isinstance(filename, str) or not filename.startswith(name + "."):
        return False
    rest = filename[len(name):]
    return rest == ".index" or bool(_DATA_RE.match(rest))


def check_filename(filename, what="file name"):
    """Returns `filename` if it is one plain path component, else raises.

    Refuses the empty name, `.`, `..`, separators (`/`, `\\`), NUL and
    control characters: a name read from a store never leaves its directory
    or prefix.

    Raises:
        CorruptCheckpointError: naming the refused `filename`.
    """
    if (
        not isinstance(filename, str)
        or filename in ("", ".", "..")
        or len(filename) > 255
        or any(c in filename for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in filename)
        or os.path.isabs(filename)
        or (os.altsep and os.altsep in filename)
    ):
        raise CorruptCheckpointError(
            f"Refusing the {what} {filename!r}: not a plain file name (one "
            "path component). A checkpoint only names files in its own "
            "directory."
        )
    return filename


def check_key(key):
    """Returns `key`, a relative object key (`a/b`), if each of its
    `/`-separated parts is a plain file name (see `check_filename`), so it
    stays under its prefix; else raises `CorruptCheckpointError`."""
    if not isinstance(key, str):
        check_filename(key, what="object name")
    for part in key.split("/"):
        try:
            check_filename(part, what="object name")
        except CorruptCheckpointError:
            raise CorruptCheckpointError(
                f"Refusing the object name {key!r}: not a relative name "
                "under the prefix (empty, `.` or `..` parts, a leading `/`, "
                "a backslash or a control character)."
            ) from None
    return key


def confined(directory, filename):
    """`os.path.join(directory, filename)` for a single-component name.

    Every file operation on a name that came from a store (a manifest, a
    listing, a `checkpoint` pointer) goes through here, so none can reach
    outside `directory`.

    Raises:
        CorruptCheckpointError: `filename` is not one plain path component.
    """
    return os.path.join(directory, check_filename(filename))


def manifest_name(name):
    return f"{name}.json"


def names_from_listing(filenames):
    """Checkpoint names that have a manifest among `filenames`, oldest first.

    Only top-level names count: `sub/ckpt-1.json` is not a checkpoint of
    this directory or prefix.
    """
    names = []
    for filename in filenames:
        match = _MANIFEST_RE.match(filename) if isinstance(
            filename, str) else None
        if match and step_of(match.group(1)) is not None:
            names.append(match.group(1))
    return sorted(set(names), key=step_of)


# CRC32C, as GCS and TensorFlow's own tensor bundles use: hardware-accelerated
# (about 5 GB/s here, against 1 GB/s for SHA-256), which matters when a
# background writer shares two cores with training. Manifests name the
# algorithm with the key, so "sha256" entries are still verified.
CHECKSUM = "crc32c"


def _digest(path, hasher):
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher.digest().hex()


def _crc32c_hex(path):
    import google_crc32c

    return _digest(path, google_crc32c.Checksum())


def _sha256_hex(path):
    return _digest(path, hashlib.sha256())


_ALGORITHMS = {"crc32c": _crc32c_hex, "sha256": _sha256_hex}
_HEX_LENGTH = {"crc32c": 8, "sha256": 64}


def file_checksum(path, algorithm=CHECKSUM):
    """Hex checksum of a file (`"crc32c"` or `"sha256"`)."""
    return _ALGORITHMS[algorithm](path)


def checksum_problem(path, entry):
    """None if `path` matches the checksum of its manifest `entry`, else why."""
    for algorithm in _ALGORITHMS:
        if algorithm in entry:
            got = file_checksum(path, algorithm)
            if got != entry[algorithm]:
                return (
                    f"fails its {algorithm.upper()} checksum (got {got}, the "
                    f"manifest says {entry[algorithm]})"
                )
            return None
    return "has no checksum in the manifest"


def same_content(entry, other):
    """Whether two manifest entries vouch for the same bytes."""
    if not other or int(entry["size"]) != int(other.get("size", -1)):
        return False
    return any(
        algorithm in entry and entry.get(algorithm) == other.get(algorithm)
        for algorithm in _ALGORITHMS
    )


@dataclasses.dataclass
class Manifest:
    """The commit record of one checkpoint (`ckpt-<N>.json`)."""

    name: str
    step: int
    epoch: int
    batch: int
    timestamp: float
    files: dict  # filename -> {"size": int, "crc32c": hex str}
    metrics: dict = dataclasses.field(default_factory=dict)
    variables: dict = dataclasses.field(default_factory=dict)
    state: dict = dataclasses.field(default_factory=dict)
    history: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True,
                          default=_json_default)

    @classmethod
    def from_json(cls, text, source="<manifest>", name=None):
        """Parses and validates a manifest read from a store.

        Everything read from a store is untrusted: every field is
        type-checked (see docs/manifest.md) and only a manifest that passes
        becomes a `Manifest`.

        Args:
            text: bytes or str, the manifest file's content.
            source: str, its path or URL, for error messages.
            name: str or None, the checkpoint its file name says it is
                (`ckpt-12` for `ckpt-12.json`); the manifest's `name` must
                match it.

        Raises:
            InvalidManifestError: (a `CorruptCheckpointError`) the text is
                not a valid manifest; the message names the field.
        """
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise InvalidManifestError(
                f"Manifest {source} is not valid JSON ({_short(e)}). The "
                "checkpoint is incomplete or damaged; it will not be restored."
            ) from None
        try:
            return cls(**_validated(data, name))
        except _Invalid as e:
            raise InvalidManifestError(
                f"Manifest {source} is invalid: {e}. The checkpoint will not "
                "be restored."
            ) from None

    @classmethod
    def read(cls, path):
        match = _MANIFEST_RE.match(os.path.basename(path))
        with open(path, "rb") as f:
            return cls.from_json(f.read(), source=path,
                                 name=match.group(1) if match else None)

    @property
    def total_bytes(self):
        return sum(int(entry["size"]) for entry in self.files.values())


class _Invalid(Exception):
    """Why a manifest fails the schema; becomes `InvalidManifestError`."""


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_is_int = _args.is_int
_is_number = _args.is_number


def _count(data, field, required=True):
    value = data.get(field)
    if value is None and not required:
        return 0
    if not _is_int(value) or not 0 <= value <= MAX_INT:
        raise _Invalid(
            f"`{field}` is {_short(value)}, expected a non-negative int")
    return value


def _container(data, field, kind, words):
    value = data.get(field, kind())
    if not isinstance(value, kind):
        raise _Invalid(f"`{field}` is {_short(value)}, expected {words}")
    return value


def _validated(data, expected_name):
    """The `Manifest` fields of parsed JSON `data`, or raises `_Invalid`."""
    if not isinstance(data, dict):
        raise _Invalid(f"the top level is {type(data).__name__}, expected "
                       "a JSON object")
    fmt = data.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("keras_ckpt/"):
        raise _Invalid(f"`format` is {_short(fmt)}, expected "
                       f"{MANIFEST_FORMAT!r}: not a keras_ckpt manifest")
    name = data.get("name")
    step = step_of(name)
    if step is None:
        raise _Invalid(f"`name` is {_short(name)}, expected ckpt-<N>")
    if expected_name is not None and name != expected_name:
        raise _Invalid(f"`name` is {name!r} but the file is "
                       f"{manifest_name(expected_name)}")
    fields = {"name": name, "format": fmt}
    for field in ("step", "epoch", "batch"):
        fields[field] = _count(data, field)
    # N in ckpt-<N> is the commit order: the global step, or more for a
    # branch's checkpoints, numbered after the abandoned run's (concepts.md).
    if fields["step"] > step:
        raise _Invalid(f"`step` is {fields['step']}, more than the number "
                       f"of its name {name}")
    timestamp = data.get("timestamp")
    if not _is_number(timestamp) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise _Invalid(f"`timestamp` is {_short(timestamp)}, expected a "
                       "POSIX time (a finite non-negative number)")
    fields["timestamp"] = timestamp
    fields["files"] = _validated_files(data.get("files"), name)
    metrics = _container(data, "metrics", dict, "an object of numbers")
    for key, value in metrics.items():
        if not _is_number(value):
            raise _Invalid(f"`metrics[{_short(key)}]` is {_short(value)}, "
                           "expected a number")
    fields["metrics"] = metrics
    fields["variables"] = _validated_variables(
        _container(data, "variables", dict, "an object of variable lists"))
    fields["state"] = _container(data, "state", dict, "an object")
    history = _container(data, "history", dict, "an object")
    epochs, logs = history.get("epochs", []), history.get("logs", {})
    if (not isinstance(epochs, list) or not all(_is_int(e) for e in epochs)
            or not isinstance(logs, dict)
            or not all(isinstance(v, list) for v in logs.values())):
        raise _Invalid("`history` needs `epochs`, a list of ints, and "
                       "`logs`, an object of lists")
    fields["history"] = history
    metadata = _container(data, "metadata", dict, "an object")
    for key, kind in (("versions", dict), ("model_config", dict),
                      ("model_class", str)):
        if metadata.get(key) is not None and not isinstance(
                metadata[key], kind):
            raise _Invalid(f"`metadata.{key}` is {_short(metadata[key])}, "
                           f"expected {kind.__name__} or null")
    fields["metadata"] = metadata
    return fields


def _validated_files(files, name):
    if not isinstance(files, dict) or not files:
        raise _Invalid(f"`files` is {_short(files)}, expected an object "
                       "naming the checkpoint's files")
    for filename, entry in files.items():
        if not is_checkpoint_file(name, filename):
            raise _Invalid(
                f"`files` lists {_short(filename)}, which is not one of "
                f"{name}'s own files ({name}.index, "
                f"{name}.data-NNNNN-of-NNNNN)")
        if not isinstance(entry, dict):
            raise _Invalid(f"`files[{filename!r}]` is {_short(entry)}, "
                           "expected an object with size and checksum")
        size = entry.get("size")
        if not _is_int(size) or not 0 <= size <= MAX_INT:
            raise _Invalid(f"`files[{filename!r}].size` is {_short(size)}, "
                           "expected a non-negative int")
        sums = [a for a in _ALGORITHMS if a in entry]
        if not sums:
            raise _Invalid(f"`files[{filename!r}]` has no checksum "
                           f"({' or '.join(_ALGORITHMS)})")
        for algorithm in sums:
            value = entry[algorithm]
            if (not isinstance(value, str)
                    or len(value) != _HEX_LENGTH[algorithm]
                    or not _HEX_RE.match(value)):
                raise _Invalid(
                    f"`files[{filename!r}].{algorithm}` is {_short(value)}, "
                    f"expected {_HEX_LENGTH[algorithm]} lowercase hex digits")
    if f"{name}.index" not in files:
        raise _Invalid(f"`files` lacks {name}.index")
    return files


def _validated_variables(variables):
    for group, specs in variables.items():
        if not isinstance(specs, list):
            raise _Invalid(f"`variables[{_short(group)}]` is {_short(specs)}"
                           ", expected a list")
        for spec in specs:
            if (not isinstance(spec, list) or len(spec) < 3
                    or not isinstance(spec[0], str)
                    or not isinstance(spec[1], list)
                    or not all(_is_int(d) and 0 <= d <= MAX_INT
                               for d in spec[1])
                    or not isinstance(spec[2], str)):
                raise _Invalid(
                    f"`variables[{_short(group)}]` holds {_short(spec)}, "
                    "expected [path, shape (list of non-negative ints), "
                    "dtype]")
    return variables


def _json_default(value):
    # numpy scalars and arrays that slip into metrics or state.
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float):
        return value
    raise TypeError(f"Cannot write {type(value).__name__} to a manifest.")


def commit_order(filenames):
    """A checkpoint's files in the order they are written: data before
    index, as `tf.train.Checkpoint` writes them (the manifest comes after
    both)."""
    return sorted(filenames, key=lambda f: (f.endswith(".index"), f))


def describe_files(directory, filenames):
    """Returns the manifest `files` entry for files in `directory`."""
    return {
        filename: {
            "size": os.path.getsize(confined(directory, filename)),
            CHECKSUM: file_checksum(confined(directory, filename)),
        }
        for filename in filenames
    }


def size_problems(manifest, sizes):
    """What is missing or truncated, given `{filename: size}` of a listing."""
    problems = []
    for filename, entry in sorted(manifest.files.items()):
        size = sizes.get(filename)
        if size is None:
            problems.append(f"{filename} is missing")
        elif size != int(entry["size"]):
            problems.append(
                f"{filename} has {size} bytes, manifest says {entry['size']}"
            )
    return problems


def local_problems(directory, manifest, checksums=False):
    """Lists what is wrong with a local checkpoint's files (empty if fine)."""
    sizes = {}
    for filename in manifest.files:
        try:
            sizes[filename] = os.path.getsize(confined(directory, filename))
        except OSError:
            pass
    problems = size_problems(manifest, sizes)
    if checksums and not problems:
        for filename, entry in sorted(manifest.files.items()):
            try:
                problem = checksum_problem(confined(directory, filename),
                                           entry)
            except OSError as e:
                problem = f"cannot be read ({e.strerror or e})"
            if problem:
                problems.append(f"{filename} {problem}")
    return problems


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `list_checkpoints()` and `restore()` report about a checkpoint.

    Attributes:
        name: `ckpt-<N>`.
        step: global batch count when it was saved.
        epoch: epoch training resumes in (0-based).
        batch: batches of `epoch` already trained when it was saved.
        path: local prefix (`<dir>/ckpt-<N>`), or None for a remote one.
        url: remote prefix (`s3://b/p/ckpt-<N>`), or None for a local one.
        timestamp: POSIX time of the save.
        metrics: logged metrics at save time.
        complete: whether every file listed in the manifest is present with
            the right size.
        size: total bytes of the checkpoint's files.
        problems: tuple of str, why the checkpoint is not complete: a file
            missing or truncated, or the manifest invalid (then `epoch`,
            `batch`, `timestamp` and `size` are 0). Empty when complete.
    """

    name: str
    step: int
    epoch: int
    batch: int
    path: Any = None
    url: Any = None
    timestamp: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)
    complete: bool = True
    size: int = 0
    problems: tuple = ()

    @classmethod
    def from_manifest(cls, manifest, path=None, url=None, complete=True,
                      problems=()):
        return cls(
            name=manifest.name,
            step=manifest.step,
            epoch=manifest.epoch,
            batch=manifest.batch,
            path=path,
            url=url,
            timestamp=manifest.timestamp,
            metrics=dict(manifest.metrics),
            complete=complete and not problems,
            size=manifest.total_bytes,
            problems=tuple(problems),
        )

    @classmethod
    def from_listed(cls, listed, path=None, url=None):
        """The info of one `Listed` checkpoint, valid or not."""
        if listed.manifest is not None:
            return cls.from_manifest(listed.manifest, path=path, url=url,
                                     problems=listed.problems)
        return cls(name=listed.name, step=step_of(listed.name), epoch=0,
                   batch=0, path=path, url=url, complete=False,
                   problems=tuple(listed.problems))


# --- listing: one function for the local directory and every store ---


@dataclasses.dataclass(frozen=True)
class Listed:
    """One checkpoint found in a listing, valid or not.

    Attributes:
        name: `ckpt-<N>`, from the manifest's file name.
        manifest: the validated `Manifest`, or None if it is invalid.
        problems: tuple of str, why it is not complete (empty if it is).
    """

    name: str
    manifest: Any
    problems: tuple = ()

    @property
    def complete(self):
        return self.manifest is not None and not self.problems

    @property
    def step(self):
        return step_of(self.name)


def list_store(sizes, read_manifest, location):
    """Lists the checkpoints of a directory or prefix, oldest first.

    The one listing of keras_ckpt: every `Store` (the local directory too),
    the CLI and resume all answer through it. Nothing read here raises: a
    manifest that fails the schema (or a file it lists that is missing or
    truncated) makes that checkpoint invalid, with its reason, and the
    others are unaffected.

    Args:
        sizes: dict, `{filename: size}` of every file at the top level.
        read_manifest: callable, `read_manifest(filename)` returns the bytes
            of a manifest file, None if it vanished since the listing, or
            raises `CorruptCheckpointError` if it cannot be read.
        location: str, the directory or URL, for messages.

    Returns:
        A list of `Listed`, oldest first.
    """
    listed = []
    for name in names_from_listing(sizes):
        filename = manifest_name(name)
        source = f"{location.rstrip('/')}/{filename}"
        try:
            data = read_manifest(filename)
            if data is None:
                continue  # deleted since the listing
            manifest = Manifest.from_json(data, source=source, name=name)
        except CorruptCheckpointError as e:
            listed.append(Listed(name, None, (str(e),)))
            continue
        listed.append(Listed(name, manifest,
                             tuple(size_problems(manifest, sizes))))
    return listed


# --- the `checkpoint` pointer file (tf.train.CheckpointManager's format) ---


def format_pointer(names, timestamps=None, last_preserved_timestamp=None):
    """Text of a `checkpoint` file naming `names` (oldest first, last = latest)."""
    if not names:
        raise ValueError("A pointer needs at least one checkpoint name.")
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in names]
    for stamp in timestamps or []:
        lines.append(f"all_model_checkpoint_timestamps: {float(stamp)!r}")
    if last_preserved_timestamp is not None:
        lines.append(
            f"last_preserved_timestamp: {float(last_preserved_timestamp)!r}"
        )
    return "\n".join(lines) + "\n"


def parse_pointer(text):
    """Returns (latest_name, all_names) from a `checkpoint` file's text.

    The file is untrusted: only canonical checkpoint names (`ckpt-<N>`,
    with or without a directory, as `tf.train.CheckpointManager` may write
    absolute paths) are returned; any other entry is ignored, so a crafted
    pointer cannot name a path outside the directory.
    """
    latest = None
    names = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip().strip('"')
        name = value.replace("\\", "/").rpartition("/")[2]
        if step_of(name) is None:
            continue
        if key.strip() == "model_checkpoint_path":
            latest = name
        elif key.strip() == "all_model_checkpoint_paths":
            names.append(name)
    return latest, names


def atomic_write(path, data, replace=True):
    """Writes `data` (bytes or str) to `path` durably: tmp file, fsync, then
    rename over `path` (`replace=True`) or link it to `path` only if `path`
    does not exist (`replace=False`: an atomic create-if-absent, which
    returns False if `path` existed). Returns True once written."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists
    except FileExistsError:
        return False
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass  # renamed into place (or never created)
    fsync_dir(os.path.dirname(path) or ".")
    return True


def fsync_file(path):
    """Flushes a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
