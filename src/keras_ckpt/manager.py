"""The local checkpoint directory: write, commit, read, retain.

This is the only module that touches `tf.train.Checkpoint`. Files keep
TensorFlow's checkpoint format (`bundle.py` writes it in one pass, byte for
byte as `tf.train.Checkpoint.write` would) and `tf.train.CheckpointManager`'s
naming (`ckpt-<N>.data-00000-of-00001`,
`ckpt-<N>.index`, `checkpoint`), so `tf.train.latest_checkpoint()`,
`tf.train.load_checkpoint()` and `tf.train.CheckpointManager` read a keras_ckpt
directory as their own. We do not call `CheckpointManager.save()` because it
writes the `checkpoint` pointer before we can write the manifest; the commit
order here is data -> index -> manifest -> pointer, each fsync'ed.
"""

import dataclasses
import functools
import logging
import os
import shutil
import sys
import time

import numpy as np

from keras_ckpt import bundle
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import CheckpointWriteError
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import StorageError

logger = logging.getLogger("keras_ckpt")

DATA_SUFFIX = bundle.DATA_SUFFIX
INDEX_SUFFIX = bundle.INDEX_SUFFIX
_MAX_MODES = ("acc", "auc", "precision", "recall", "f1", "iou", "fmeasure")


def resolve_mode(monitor, mode):
    """"auto" -> "max" for accuracy-like metrics, else "min" (as Keras)."""
    if mode != "auto" or monitor is None:
        return mode
    name = monitor.removeprefix("val_").lower()
    return "max" if any(key in name for key in _MAX_MODES) else "min"


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep: the union of three rules.

    Args:
        max_to_keep: int or None, keep the newest N. None keeps all.
        keep_every_n_hours: float or None, also keep one checkpoint in every
            N-hour window.
        monitor: str or None, the logged metric that ranks checkpoints.
        mode: "min" or "max" (already resolved from "auto").
        keep_best: int, also keep the best K checkpoints by `monitor`.
    """

    max_to_keep: int = 3
    keep_every_n_hours: float = None
    monitor: str = None
    mode: str = "min"
    keep_best: int = 1

    def best(self, manifests):
        """Manifests that logged `monitor`, best first."""
        if self.monitor is None:
            return []
        ranked = [
            m for m in manifests
            if isinstance(m.metrics.get(self.monitor), (int, float))
            and np.isfinite(m.metrics[self.monitor])
        ]
        return sorted(
            ranked,
            key=lambda m: m.metrics[self.monitor],
            reverse=self.mode == "max",
        )

    def select(self, manifests):
        """Names to keep among `manifests` (oldest first)."""
        keep = set()
        if self.max_to_keep is None:
            keep.update(m.name for m in manifests)
        elif self.max_to_keep > 0:
            keep.update(m.name for m in manifests[-self.max_to_keep:])
        if self.keep_every_n_hours:
            window = self.keep_every_n_hours * 3600.0
            last = None
            for m in manifests:
                if last is None or m.timestamp - last >= window:
                    keep.add(m.name)
                    last = m.timestamp
        keep.update(m.name for m in self.best(manifests)[: self.keep_best])
        if manifests:
            keep.add(manifests[-1].name)  # never drop the latest
        return keep

    def archives(self, manifests):
        """Names kept only by `keep_every_n_hours` (oldest first): the
        archives, which an archive storage class applies to."""
        if not self.keep_every_n_hours:
            return []
        rolling = dataclasses.replace(self, keep_every_n_hours=None)
        keep, others = self.select(manifests), rolling.select(manifests)
        return [m.name for m in manifests if m.name in keep - others]


def _attr(group):
    return group.replace("/", "__")


def tensor_key(group, index):
    """Name of a tensor in the TF checkpoint (see `tf.train.list_variables`)."""
    return f"{_attr(group)}/.ATTRIBUTES/{index:05d}"


class LocalCheckpoints:
    """The local checkpoint directory: TensorFlow-format files written in
    place (`bundle.py`), then committed, listed, retained and deleted
    through the directory's `LocalStore` by the protocol every store shares
    (`store.base.Store`): the manifest after the data and index, the
    `checkpoint` pointer last."""

    def __init__(self, directory):
        from keras_ckpt.store.local import LocalStore

        self.store = LocalStore.of_directory(directory)
        self.directory = self.store.directory
        self._warned = set()

    # -- paths ----------------------------------------------------------
    def prefix(self, name):
        return manifest_lib.confined(self.directory, name)

    def data_files(self, name):
        return [name + DATA_SUFFIX, name + INDEX_SUFFIX]

    def manifest_path(self, name):
        return manifest_lib.confined(
            self.directory, manifest_lib.manifest_name(name))

    # -- reading --------------------------------------------------------
    def listing(self):
        """Every checkpoint of the directory, valid or not, oldest first:
        a list of `manifest.Listed` (see `manifest.list_store`)."""
        if not os.path.isdir(self.directory):
            return []
        return self.store.listing()

    def list_checkpoints(self):
        """`CheckpointInfo` of every checkpoint, invalid ones included
        (`complete=False`, with `problems`), oldest first; the same shape
        as `Store.list_checkpoints()`, with `path` instead of `url`."""
        return [
            manifest_lib.CheckpointInfo.from_listed(
                listed, path=self.prefix(listed.name))
            for listed in self.listing()
        ]

    def manifests(self, include_incomplete=False):
        """Manifests of the directory's complete checkpoints, oldest first.

        Invalid or incomplete checkpoints are skipped with one warning each
        (listed with `include_incomplete=True`, as
        `(manifest_or_None, problems)`).
        """
        result = []
        for listed in self.listing():
            problems = list(listed.problems)
            if problems:
                self._warn_broken(listed.name, problems)
                if include_incomplete:
                    result.append((listed.manifest, problems))
                continue
            result.append((listed.manifest, []) if include_incomplete
                          else listed.manifest)
        return result

    def _warn_broken(self, name, problems):
        if name in self._warned:
            return
        self._warned.add(name)
        logger.warning(
            "keras_ckpt: skipping incomplete checkpoint %s: %s",
            self.prefix(name), "; ".join(problems),
        )

    def names(self):
        """Names of every checkpoint with a manifest, complete or not,
        oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return manifest_lib.names_from_listing(self.store.list_files())

    def get(self, name):
        for manifest in self.manifests():
            if manifest.name == name:
                return manifest
        return None

    def read_arrays(self, manifest, verify=False):
        """Reads a checkpoint's tensors: {group: [np.ndarray]} (+ rng_paths)."""
        if verify:
            problems = manifest_lib.local_problems(
                self.directory, manifest, checksums=True
            )
            if problems:
                raise CorruptCheckpointError(
                    f"Checkpoint {self.prefix(manifest.name)} is damaged: "
                    + "; ".join(problems)
                )
        import tensorflow as tf

        try:
            reader = tf.train.load_checkpoint(self.prefix(manifest.name))
            arrays = {
                group: [
                    reader.get_tensor(tensor_key(group, i))
                    for i in range(len(specs))
                ]
                for group, specs in manifest.variables.items()
            }
        except (tf.errors.OpError, ValueError) as e:
            raise CorruptCheckpointError(
                f"Checkpoint {self.prefix(manifest.name)} cannot be read: "
                f"{getattr(e, 'message', e)}"
            ) from None
        arrays["rng_paths"] = [s[0] for s in manifest.variables.get("rng", [])]
        return arrays

    # -- writing --------------------------------------------------------
    def ensure_directory(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(
                f"Cannot create checkpoint directory {self.directory}: "
                f"{e.strerror or e}."
            ) from e

    def write(self, snapshot, *, step, epoch, batch, metrics=None,
              history=None, metadata=None, name=None, cancelled=None,
              progress=None):
        """Writes and commits checkpoint `name`; returns its Manifest.

        `name` defaults to `ckpt-<step>`; a run that branched from an older
        checkpoint numbers its checkpoints after the newer ones already
        there (see `commit.Committer`), so `name` and `step` can differ.

        The snapshot's tensors are handed to the writer, which drops each
        one once it is on disk: `snapshot.tensors` is empty afterwards.
        `cancelled` (polled between chunks) stops the write with
        `bundle.Cancelled`; `progress` is called with the bytes written.

        On any failure the partial files of this checkpoint are removed and
        `CheckpointWriteError` is raised; earlier checkpoints are untouched.
        """
        name = name or manifest_lib.checkpoint_name(step)
        self.ensure_directory()
        # Leftovers of an earlier crashed save: manifest first, so it is
        # never seen complete with the new files.
        self.delete(name)
        try:
            files = self._write_files(snapshot, name, cancelled, progress)
            for filename in self.data_files(name):
                _fsync_file(os.path.join(self.directory, filename))
            manifest_lib.fsync_dir(self.directory)
            manifest = manifest_lib.Manifest(
                name=name,
                step=int(step),
                epoch=int(epoch),
                batch=int(batch),
                timestamp=time.time(),
                files=files,
                metrics=_clean_metrics(metrics or {}),
                variables=snapshot.specs,
                state=snapshot.values,
                history=history or {},
                metadata=metadata or {},
            )
            self.store.write_bytes(manifest_lib.manifest_name(name),
                                   manifest.to_json())
        except BaseException as e:
            self._remove_files(name)
            if isinstance(e, (KeyboardInterrupt, SystemExit, bundle.Cancelled)):
                raise
            raise CheckpointWriteError(
                f"Could not write checkpoint {self.prefix(name)}: "
                f"{_describe_error(e)}. Earlier checkpoints are intact."
            ) from e
        return manifest

    def _write_files(self, snapshot, name, cancelled, progress):
        """Writes the data and index files; returns the manifest's `files`."""
        tensors, snapshot.tensors = snapshot.tensors, {}
        rows = sorted(
            (tensor_key(group, i), t.dtype.as_datatype_enum, t.shape,
             functools.partial(_host_bytes, t))
            for group, group_tensors in tensors.items()
            for i, t in enumerate(group_tensors)
        )
        if not all(bundle.supported(row[1]) for row in rows):
            # A dtype the one-pass writer does not know: TensorFlow writes.
            return self._write_files_with_tf(tensors, name)
        structure = tuple((_attr(g), len(ts)) for g, ts in tensors.items())
        del tensors
        rows.append((bundle.OBJECT_GRAPH_KEY, bundle.DT_STRING, (),
                     np.array(_object_graph(structure), dtype=object)))
        written = bundle.write(self.prefix(name), rows, cancelled=cancelled,
                               progress=progress)
        return {
            filename: {"size": size, manifest_lib.CHECKSUM: crc}
            for filename, (size, crc) in written.items()
        }

    def _write_files_with_tf(self, tensors, name):
        import tensorflow as tf

        from keras_ckpt import _keras_compat

        trackables = {
            _attr(group): _keras_compat.tensor_list(group_tensors)
            for group, group_tensors in tensors.items()
        }
        tf.train.Checkpoint(**trackables).write(self.prefix(name))
        return manifest_lib.describe_files(self.directory,
                                           self.data_files(name))

    def retain(self, policy, keep=None):
        """Deletes checkpoints outside `policy`; returns the kept manifests.

        Runs only after a new checkpoint committed, so the checkpoint a run
        resumed from is never deleted before a newer one exists. The
        pointer names the kept checkpoints, then the others are deleted,
        with the leftovers of interrupted saves older than the newest
        (`Store.retain()`).

        Args:
            policy: `RetentionPolicy`.
            keep: set of names or None: what to keep, when decided over more
                than this directory (the union with the mirror's
                checkpoints); None applies `policy` to this directory.
        """
        manifests = self.manifests()
        if keep is None:
            keep = policy.select(manifests)
        kept = [m for m in manifests if m.name in keep]
        if not kept:
            return kept
        try:
            self.store.retain([m.name for m in kept],
                              [m.timestamp for m in kept],
                              drop_damaged=False)
        except StorageError as e:
            raise CheckpointWriteError(
                f"Could not update {self.directory}/checkpoint or delete a "
                f"dropped checkpoint: {_describe_error(e)} Earlier "
                "checkpoints are intact."
            ) from e
        return kept

    def delete(self, name):
        """Deletes a checkpoint: manifest first, so it stops being complete;
        then its files, and what TensorFlow's writer left of it
        (`<name>_temp*`)."""
        if os.path.isdir(self.directory):
            self.store.delete_checkpoint(name)
        self._remove_files(name)

    def _remove_files(self, name):
        """Removes the files of an uncommitted checkpoint `name`: a failed
        write's partial files, TensorFlow's `<name>_temp*` directories."""
        try:
            filenames = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for filename in filenames:
            if filename == manifest_lib.manifest_name(name):
                continue
            if filename.startswith(name + ".") or filename.startswith(
                name + "_temp"
            ):
                path = os.path.join(self.directory, filename)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass


_fsync_file = manifest_lib.fsync_file


def _host_bytes(tensor):
    """A numpy view of the tensor's buffer, without copying it.

    `EagerTensor.numpy()` copies (measured: 0.1-0.8 s per GB on a training
    host, in memory the process had to fault in), so a CPU tensor is
    reinterpreted as bytes (`tf.bitcast` shares the buffer) and handed to
    numpy through DLPack, which keeps the tensor alive while the view is.
    Strings, tensors on an accelerator (copied to the host anyway) and
    dtypes DLPack does not carry take `numpy()`.
    """
    import tensorflow as tf

    if (tensor.dtype in _bitcast_dtypes() and "CPU" in tensor.device
            and tensor.shape.num_elements()):
        try:
            if tensor.dtype != tf.bool:
                tensor = tf.bitcast(tensor, tf.uint8)
            return np.from_dlpack(_DLPack(tensor))
        except (RuntimeError, TypeError, ValueError, BufferError,
                tf.errors.OpError):
            pass
    return tensor.numpy()


class _DLPack:
    """The DLPack protocol numpy expects, over `tf.experimental.dlpack`."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        import tensorflow as tf

        return tf.experimental.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU: only CPU tensors come here


@functools.cache
def _bitcast_dtypes():
    import tensorflow as tf

    return frozenset([
        tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.int16,
        tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64,
        tf.complex64, tf.complex128, tf.bool])


@functools.lru_cache(maxsize=8)
def _object_graph(structure):
    """The serialized object graph `tf.train.Checkpoint.write` stores for
    groups `structure` = ((attribute, number of tensors), ...).

    It names the tensors' keys only, so TensorFlow writes it once for
    placeholder scalars, and each checkpoint of that structure reuses it.
    """
    import tempfile

    import tensorflow as tf

    from keras_ckpt import _keras_compat

    with tempfile.TemporaryDirectory(prefix="keras_ckpt-graph-") as tmp:
        prefix = os.path.join(tmp, "graph")
        tf.train.Checkpoint(**{
            attr: _keras_compat.tensor_list([tf.zeros([])] * count)
            for attr, count in structure
        }).write(prefix)
        return tf.train.load_checkpoint(prefix).get_tensor(
            bundle.OBJECT_GRAPH_KEY)


def _describe_error(e):
    tf = sys.modules.get("tensorflow")  # not imported: not a TF error
    if tf is not None and isinstance(e, tf.errors.OpError):
        return e.message.splitlines()[0]
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename or ''})".replace(" ()", "")
    return str(e) or type(e).__name__


def _clean_metrics(metrics):
    clean = {}
    for key, value in metrics.items():
        try:
            clean[str(key)] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return clean
