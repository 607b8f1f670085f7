"""Where checkpoints live: the local directory, a mirror URL, a branch path.

Resolves `Checkpoint(directory=..., mirror=...)` against the platform presets;
parses every source a user names (`parse_source`, the one URL parser); and
picks, fetches and verifies a checkpoint by name, step, "latest" or "best"
(`open_checkpoint`, the one read path of `restore()`, `load_model()`,
`keras-ckpt export` and a branching `resume=`; `resume.py` builds the
resume's choice from the same pieces). No TensorFlow is imported here, so
`list_checkpoints()` answers without it.
"""

import dataclasses
import json
import logging
import os
import platform as python_platform
import tempfile
import typing
import urllib.parse

from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
)

logger = logging.getLogger("keras_ckpt")


@dataclasses.dataclass
class Paths:
    directory: str
    uploader: object
    platform: object


def _detect_platform():
    from keras_ckpt.platforms import detect_platform

    return detect_platform()


def resolve_paths(directory, mirror):
    """Applies the platform preset to `directory` and `mirror`."""
    platform = _detect_platform()
    if directory is None:
        directory = platform.checkpoint_dir
    if mirror is None:
        mirror = platform.mirror_url
    uploader = None
    if isinstance(mirror, (str, os.PathLike)) and not is_url(
            os.fspath(mirror)):
        # A plain local path: the file:// mirror of that directory.
        check_path(os.fspath(mirror), "mirror")
        mirror = "file://" + os.path.abspath(os.fspath(mirror))
    if mirror is not None:
        from keras_ckpt.store import get_uploader

        try:
            uploader = get_uploader(mirror)
        except ValueError as e:
            message = str(e).replace("Invalid value for argument `url`. ", "")
            raise ValueError(
                f"Invalid value for argument `mirror`. {message}") from e
    return Paths(
        directory=os.path.abspath(os.fspath(directory)),
        uploader=uploader,
        platform=platform,
    )


def check_local_directory(path, argument="directory"):
    """Fails early if `path` cannot hold checkpoints; creates nothing."""
    probe_dir = path
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise CheckpointWriteError(
            f"Invalid value for argument `{argument}`: {probe_dir} is a file, "
            f"not a directory, so {path} cannot hold checkpoints."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".keras_ckpt-probe-", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointWriteError(
            f"Invalid value for argument `{argument}`: cannot write to "
            f"{probe_dir} ({e.strerror or e}). Choose a writable directory."
        ) from None


def metadata(model):
    """Versions, platform and (when serializable) the model's config."""
    import keras
    import tensorflow as tf

    from keras_ckpt import __version__

    config = None
    try:
        config = keras.saving.serialize_keras_object(model)
        json.dumps(config)
    except Exception:  # subclassed models without get_config()
        config = None
    from keras_ckpt import _keras_compat as compat

    legacy = compat.is_legacy_model(model)
    if legacy:
        # A tf_keras config, which Keras 3 (`keras-ckpt export`) cannot rebuild.
        config = None
    return {
        "versions": {
            "keras_ckpt": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            **({"tf_keras": compat.tf_keras.__version__} if legacy else {}),
            "python": python_platform.python_version(),
        },
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": config,
    }


def info(manifest, store, origin=None):
    url = origin if is_url(origin) else None
    return manifest_lib.CheckpointInfo.from_manifest(
        manifest, path=store.prefix(manifest.name), url=url
    )


class Found(typing.NamedTuple):
    """A chosen, verified checkpoint: its manifest, the local directory
    (`LocalCheckpoints`) holding its files, and where it came from (a local
    prefix or a URL)."""

    manifest: object
    store: object
    origin: str


# ---------------------------------------------------------------------------
# The one parser of what a user names as a source.


def is_url(value):
    """Whether `value` is a URL (`scheme://...`, a scheme of two or more
    letters or digits, so `C:\\dir` is a path)."""
    if not isinstance(value, str):
        return False
    scheme, sep, _ = value.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.isascii() and (
        scheme.isalnum())


def is_remote(source):
    """Whether `source` is a URL other than `file://` (a local path)."""
    return is_url(source) and not source.lower().startswith("file://")


def check_path(path, argument):
    """Refuses a local path that is a mistyped URL (`s3:/bucket/run`,
    `gs:bucket/run`): it would silently become a directory named `s3:`."""
    from keras_ckpt.store import registry

    scheme, colon, rest = str(path).partition(":")
    if colon and scheme.lower() in registry.known_schemes():
        fixed = f"{scheme.lower()}://{rest.lstrip('/')}"
        if scheme.lower() == "file":
            fixed = "file://" + os.path.abspath(rest)
        raise ValueError(
            f"Invalid value for argument `{argument}`. Received: "
            f"{argument}={path!r}. Did you mean \"{fixed}\"? Expected a "
            'URL such as "s3://bucket/prefix" or a local path.'
        )
    return path


def local_path(source):
    """The local path `source` names: a path as is, a `file://` URL's path
    (percent-decoded, `file://localhost/...` included)."""
    if is_url(source):
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"Invalid value for argument `source`. Received: "
                f"source={source!r}. Expected a local path or "
                '"file:///absolute/path".')
        return urllib.parse.unquote(parts.path)
    return os.fspath(source)


def split_checkpoint_url(url):
    """`s3://b/p/ckpt-12` -> (`s3://b/p`, `ckpt-12`); a dir URL -> (url, None)."""
    base, _, last = url.rstrip("/").rpartition("/")
    if manifest_lib.step_of(last.removesuffix(".json")) is not None:
        return base, last.removesuffix(".json")
    return url.rstrip("/"), None


def parse_source(source):
    """`(location, name)` of a source a user names.

    `location` is a remote URL (`s3://b/p`) or an absolute local directory
    (a `file://` URL's path); `name` is the checkpoint the source names
    (`.../ckpt-120`, `.../ckpt-120.json`, `.../ckpt-120.index`), or None
    for a whole directory or prefix.
    """
    if is_remote(source):
        return split_checkpoint_url(source)
    if not is_url(source):
        check_path(os.fspath(source), "source")
    path = os.path.abspath(local_path(source))
    if os.path.isdir(path):
        return path, None
    base = os.path.basename(path).removesuffix(".json").removesuffix(".index")
    if manifest_lib.step_of(base) is not None:
        return os.path.dirname(path), base
    return path, None


def local_source(path):
    """(LocalCheckpoints, name or None) for a directory or `.../ckpt-N` path."""
    from keras_ckpt.manager import LocalCheckpoints

    directory, name = parse_source(path)
    if name is None and not os.path.isdir(directory):
        raise CheckpointNotFoundError(
            f"{directory} is neither a checkpoint directory nor a checkpoint "
            "(expected a directory or a path like .../ckpt-120)."
        )
    return LocalCheckpoints(directory), name


def open_store(location):
    """The `Store` of a location from `parse_source`."""
    from keras_ckpt.store import get_uploader
    from keras_ckpt.store.local import LocalStore

    if is_remote(location):
        return get_uploader(location)
    return LocalStore.of_directory(location)


def list_checkpoints(source):
    """Lists the checkpoints in a local directory or a mirror URL.

    Args:
        source: str or path-like, a local checkpoint directory or a URL
            (`s3://bucket/prefix`, `gs://...`, `az://container/prefix`,
            `file:///path`).

    Returns:
        A list of `CheckpointInfo`, oldest first, for local directories and
        URLs alike. Checkpoints that cannot be restored are listed too, with
        `complete=False` and the reason in `problems`: a file missing or
        truncated (an interrupted save or upload), or an invalid manifest
        (see the manifest schema in the docs). Listing never raises because
        of one bad checkpoint, and imports no TensorFlow.

    Example:

    >>> for info in keras_ckpt.list_checkpoints("checkpoints"):
    ...     print(info.step, info.epoch, info.batch, info.metrics)
    """
    if is_remote(source):
        return open_store(str(source)).list_checkpoints()
    store, _ = local_source(source)
    return store.list_checkpoints()


def pick(manifests, which, retention=None, source=""):
    """The manifest named by `which`: "latest", "best" or a step/name."""
    if not manifests:
        raise CheckpointNotFoundError(f"No complete checkpoint in {source}.")
    if which in (None, "latest", True):
        return manifests[-1]
    if which == "best":
        best = retention.best(manifests) if retention else []
        if not best:
            logged = sorted({k for m in manifests for k in m.metrics})
            raise CheckpointNotFoundError(
                f"No checkpoint in {source} logged the monitored metric "
                f"{getattr(retention, 'monitor', None)!r}; the metrics they "
                f"logged: {', '.join(logged) or 'none'}."
            )
        return best[0]
    if isinstance(which, str) and which.isascii() and which.isdigit():
        which = int(which)  # the CLI's --checkpoint STEP
    if isinstance(which, int) and not isinstance(which, bool):
        # A global step. After a branch two checkpoints can hold the same
        # step (the abandoned run's and the branch's): the newest commit,
        # as "latest" would.
        at_step = [m for m in manifests if m.step == which]
        if at_step:
            return at_step[-1]
        raise CheckpointNotFoundError(
            f"No complete checkpoint at step {which} in {source}; complete "
            "ones: " + ", ".join(f"{m.name} (step {m.step})" for m in manifests)
        )
    name = str(which)
    for manifest in manifests:
        if manifest.name == name:
            return manifest
    raise CheckpointNotFoundError(
        f"No complete checkpoint {name} in {source}; complete ones: "
        + ", ".join(m.name for m in manifests)
    )


def fetch_remote(uploader, which, local_dir, retention=None):
    """Downloads the chosen complete remote checkpoint into `local_dir`.

    The download is verified (sizes and checksums); files already in
    `local_dir` with the right checksum are reused, so a damaged local copy
    is repaired. For "latest" and "best", a remote checkpoint that fails
    verification is skipped with one warning naming it, and the next one is
    tried.

    Raises:
        CheckpointNotFoundError: no (valid) checkpoint to fetch.
        CorruptCheckpointError: the checkpoint `which` names is damaged.
    """
    from keras_ckpt.manager import LocalCheckpoints

    manifests = [listed.manifest for listed in uploader.listing()
                 if listed.complete]
    store = LocalCheckpoints(local_dir)
    store.ensure_directory()
    damaged = []
    while True:
        if damaged and not manifests:
            raise CorruptCheckpointError(
                f"Every checkpoint at {uploader.url} is damaged, nothing to "
                f"restore: {'; '.join(damaged)}"
            )
        chosen = pick(manifests, which, retention, source=uploader.url)
        try:
            uploader.download_checkpoint(chosen.name, store.directory)
            break
        except CorruptCheckpointError as e:
            if not _falls_back(which):
                raise
            warn_corrupt(f"{uploader.url}/{chosen.name}", e)
            manifests.remove(chosen)
            damaged.append(str(e))
    manifest = store.get(chosen.name)
    if manifest is None:
        raise CheckpointNotFoundError(
            f"Downloaded {uploader.url}/{chosen.name} but it is incomplete "
            f"in {store.directory}."
        )
    return manifest, store


def _falls_back(which):
    return which in (None, True, "latest", "best")


def warn_corrupt(location, reason):
    """The one warning for a damaged checkpoint skipped by resume/restore."""
    logger.warning(
        "keras_ckpt: skipping damaged checkpoint %s (%s); using the previous "
        "valid one. Run `keras-ckpt verify` on it, then delete it.",
        location, reason,
    )


def pick_verified(store, manifests, which, retention=None, source="",
                  damaged=None):
    """`pick()` among local checkpoints whose files pass their checksums.

    For "latest" and "best" a checkpoint that fails is skipped with one
    warning (`warn_corrupt`) and the next one is chosen; None when every
    one failed. A checkpoint named by step or name that fails raises. The
    dict `damaged`, if given, receives `{name: reason}` of those skipped.

    Raises:
        CheckpointNotFoundError: no complete checkpoint at all (`pick()`).
        CorruptCheckpointError: the checkpoint named by step/name is damaged.
    """
    manifests = list(manifests)
    skipped = False
    while manifests or not skipped:
        chosen = pick(manifests, which, retention, source)
        problems = manifest_lib.local_problems(
            store.directory, chosen, checksums=True)
        if not problems:
            return chosen
        reason = "; ".join(problems)
        if not _falls_back(which):
            raise CorruptCheckpointError(
                f"Checkpoint {store.prefix(chosen.name)} is damaged: {reason}."
                " Restore another checkpoint; `keras-ckpt verify` lists the "
                "intact ones."
            )
        warn_corrupt(store.prefix(chosen.name), reason)
        manifests.remove(chosen)
        skipped = True
        if damaged is not None:
            damaged[chosen.name] = reason
    return None


def open_checkpoint(source, which="latest", retention=None,
                    download_dir=None):
    """The one read path: the checkpoint `source` names, verified.

    `restore()`, `load_model()`, `keras-ckpt export` and a branching
    `resume=` all read through here, so each one chooses, verifies and
    falls back the same way: a checkpoint's files must pass their sizes and
    CRC32C checksums (downloaded ones as they are fetched); for "latest" and
    "best" a damaged one is skipped with one warning naming it, and the
    previous (next best) valid one is used.

    Args:
        source: a checkpoint directory or checkpoint path, or a URL of
            either (`s3://`, `gs://`, `az://`, `file://`).
        which: `"latest"`, `"best"`, a step or a name; ignored when
            `source` names a checkpoint.
        retention: `RetentionPolicy` or None, ranks `"best"`.
        download_dir: str, where a remote checkpoint is downloaded (created
            if needed); required for a remote `source`.

    Returns:
        A `Found`: the manifest, the local directory holding the files, and
        the checkpoint's origin (local prefix or URL).

    Raises:
        CheckpointNotFoundError: no such (complete) checkpoint, or nothing
            at `source`.
        CorruptCheckpointError: the checkpoint named by step or name is
            damaged, or every candidate for "latest"/"best" is.
    """
    location, name = parse_source(source)
    which = name or which
    if is_remote(location):
        uploader = open_store(location)
        manifest, store = fetch_remote(uploader, which, download_dir,
                                       retention)
        return Found(manifest, store, f"{uploader.url}/{manifest.name}")
    if name is None:
        store, _ = local_source(location)  # raises if it is no directory
    else:
        from keras_ckpt.manager import LocalCheckpoints

        store = LocalCheckpoints(location)
    damaged = {}
    manifest = pick_verified(store, store.manifests(), which, retention,
                             store.directory, damaged)
    if manifest is None:
        raise CorruptCheckpointError(
            f"Every checkpoint in {store.directory} is damaged, nothing to "
            "read: " + "; ".join(f"{n}: {r}" for n, r in damaged.items())
            + ". `keras-ckpt verify` lists them."
        )
    return Found(manifest, store, store.prefix(manifest.name))
