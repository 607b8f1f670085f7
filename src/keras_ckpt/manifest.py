"""Checkpoint manifests, the `checkpoint` pointer file, and `CheckpointInfo`.

A checkpoint `ckpt-<N>` is the TensorFlow pair `ckpt-<N>.data-00000-of-00001`
and `ckpt-<N>.index` plus the manifest `ckpt-<N>.json`, the commit record:
it lists every file with its size and CRC32C checksum, the training position, the
metrics at save time and metadata. A checkpoint is *complete* iff its manifest
exists and every file it lists exists with the listed size.

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

from keras_ckpt.errors import CorruptCheckpointError

MANIFEST_FORMAT = "keras_ckpt/1"
POINTER_NAME = "checkpoint"
_NAME_RE = re.compile(r"^ckpt-(\d+)$")
_MANIFEST_RE = re.compile(r"^(ckpt-\d+)\.json$")
_HASH_CHUNK = 8 * 1024 * 1024


def checkpoint_name(step):
    """Returns the checkpoint name for a global step, e.g. `ckpt-120`."""
    return f"ckpt-{int(step)}"


def step_of(name):
    """Returns the step number of a checkpoint name, or None."""
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def manifest_name(name):
    return f"{name}.json"


def names_from_listing(filenames):
    """Checkpoint names that have a manifest among `filenames`, oldest first."""
    names = []
    for filename in filenames:
        match = _MANIFEST_RE.match(os.path.basename(filename))
        if match:
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
    def from_json(cls, text, source="<manifest>"):
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(
                f"Manifest {source} is not valid JSON ({e}). The checkpoint is "
                "incomplete or damaged; it will not be restored."
            ) from None
        if not isinstance(data, dict) or not str(
            data.get("format", "")
        ).startswith("keras_ckpt/"):
            raise CorruptCheckpointError(
                f"{source} is not a keras_ckpt manifest."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as e:
            raise CorruptCheckpointError(
                f"Manifest {source} is missing fields: {e}"
            ) from None

    @classmethod
    def read(cls, path):
        with open(path, "rb") as f:
            return cls.from_json(f.read(), source=path)

    @property
    def total_bytes(self):
        return sum(int(entry["size"]) for entry in self.files.values())


def _json_default(value):
    # numpy scalars and arrays that slip into metrics or state.
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float):
        return value
    raise TypeError(f"Cannot write {type(value).__name__} to a manifest.")


def describe_files(directory, filenames):
    """Returns the manifest `files` entry for files in `directory`."""
    return {
        filename: {
            "size": os.path.getsize(os.path.join(directory, filename)),
            CHECKSUM: file_checksum(os.path.join(directory, filename)),
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
            sizes[filename] = os.path.getsize(os.path.join(directory, filename))
        except OSError:
            pass
    problems = size_problems(manifest, sizes)
    if checksums and not problems:
        for filename, entry in sorted(manifest.files.items()):
            problem = checksum_problem(os.path.join(directory, filename), entry)
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

    @classmethod
    def from_manifest(cls, manifest, path=None, url=None, complete=True):
        return cls(
            name=manifest.name,
            step=manifest.step,
            epoch=manifest.epoch,
            batch=manifest.batch,
            path=path,
            url=url,
            timestamp=manifest.timestamp,
            metrics=dict(manifest.metrics),
            complete=complete,
            size=manifest.total_bytes,
        )


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
    """Returns (latest_name, all_names) from a `checkpoint` file's text."""
    latest = None
    names = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip().strip('"')
        if key.strip() == "model_checkpoint_path":
            latest = os.path.basename(value)
        elif key.strip() == "all_model_checkpoint_paths":
            names.append(os.path.basename(value))
    return latest, names


def atomic_write(path, data):
    """Writes `data` (bytes or str) to `path` durably: tmp file, fsync, rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


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
