"""Distributed training: which Keras, which worker writes, and agreement.

Everything `Checkpoint` needs to know about `tf.distribute` and `tf_keras`
lives here:

- **Which Keras.** With `TF_USE_LEGACY_KERAS=1` (TensorFlow's own switch),
  `tf.keras` is `tf_keras` (Keras 2), whose `fit` calls methods that only its
  own `Callback` has. `Callback` is therefore chosen when `keras_ckpt` is
  imported: `tf_keras.callbacks.Callback` under that switch, else Keras 3's.
  The few places where the two differ (the optimizer's `built` flag, how
  `fit` is told its first epoch, the built-in callbacks in `state=`) are
  helpers here.
- **Which worker writes.** `Cluster` is this process's part in the job. Under
  `MultiWorkerMirroredStrategy` the chief (task `chief`, else `worker` 0)
  writes checkpoints, mirrors and retention; every other worker writes
  nothing to `directory` or the mirror. No save needs the other workers: a
  snapshot reads this process's own copy of each variable (`local_value`),
  so no collective op runs during a save.
- **Agreement.** Two decisions must be the same on every worker, or the
  replicas would silently diverge: which checkpoint to resume from, and at
  which step to save and stop when any worker is preempted. Both go through
  the key-value store of TensorFlow's coordination service, which
  `MultiWorkerMirroredStrategy` starts on the chief, the same channel that
  `tf.distribute.experimental.PreemptionCheckpointHandler` uses:

  * Resume: the chief picks the checkpoint (as a single worker would) and
    publishes its name; the other workers restore exactly that one, from
    `directory` if they can read it there (a shared file system, or a
    platform that syncs it, like SageMaker), else from the mirror into a
    private temporary directory that is deleted once the tensors are read.
    If the chief's pick has not reached the mirror (its upload was cut short
    by the previous crash), the chief uploads it first.
  * Preemption: the worker that gets SIGTERM publishes "save after step
    s + 1", where s is its own step count, and waits until every worker has
    acknowledged it before training on. Synchronous training keeps workers
    within one step of each other, and no worker can finish step s + 1
    without the preempted one, so every worker learns the target before it
    can pass it; all of them stop at the same batch boundary, the chief
    commits the checkpoint (and flushes the mirror), and the others wait for
    that commit before they exit.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import keras
import tensorflow as tf

from keras_ckpt import manager as manager_lib

LEGACY_KERAS_VALUES = ("true", "True", "1")  # as TensorFlow reads the switch
PREEMPTION_REASON_PEER = "preemption of"
# How long a worker waits for the chief to choose (and maybe download) the
# checkpoint to resume from, and, at the end of `fit`, to commit the final one.
AGREEMENT_TIMEOUT_SECONDS = 1800.0
_KEY_ROOT = "keras_ckpt"
_STOP = "stop"


def uses_legacy_keras(environ=None):
    """Whether `tf.keras` is `tf_keras` (`TF_USE_LEGACY_KERAS=1`)."""
    env = os.environ if environ is None else environ
    return env.get("TF_USE_LEGACY_KERAS") in LEGACY_KERAS_VALUES


def _import_tf_keras():
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras


tf_keras = _import_tf_keras() if uses_legacy_keras() else None

# The base class of keras_ckpt's callbacks: tf_keras' CallbackList calls
# tf_keras-only methods (`_implements_train_batch_hooks`, ...) on every
# callback it is given, and Keras 3's calls Keras 3-only ones.
Callback = tf_keras.callbacks.Callback if tf_keras else keras.callbacks.Callback

# Everything `isinstance` should accept as a Keras callback in `state=`.
CALLBACK_TYPES = (keras.callbacks.Callback,) + (
    (tf_keras.callbacks.Callback,) if tf_keras else ()
)


def legacy_monitor_fields():
    """The tf_keras twins of state.py's callback adapters (same fields)."""
    if tf_keras is None:
        return {}
    callbacks = tf_keras.callbacks
    return {
        callbacks.EarlyStopping: (
            "wait", "stopped_epoch", "best", "best_epoch", "best_weights",
        ),
        callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
        callbacks.ModelCheckpoint: (
            "best", "_batches_seen_since_last_saving", "_last_batch_seen",
        ),
    }


def legacy_stateless_callbacks():
    if tf_keras is None:
        return ()
    return (tf_keras.callbacks.LearningRateScheduler,
            tf_keras.callbacks.TerminateOnNaN)


def is_legacy_model(model):
    """Whether `model` is a tf_keras (Keras 2) model."""
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(model, module.Model)


def optimizer_built(optimizer):
    """Keras 3 optimizers say `built`; tf_keras' new ones keep `_built`."""
    built = getattr(optimizer, "built", None)
    if built is None:
        built = getattr(optimizer, "_built", False)
    return bool(built)


def steps_per_execution(model):
    """Batches per call of `train_function` (a variable in tf_keras)."""
    value = getattr(model, "steps_per_execution", None)
    if isinstance(value, (tf.Variable, tf.distribute.DistributedValues)):
        value = local_value(value).numpy()
    return max(1, int(value or 1))


class _ResumePosition:
    """tf_keras' hook for the epoch `fit` starts at.

    tf_keras' `fit` asks `model._training_state` (the slot its own
    `BackupAndRestore` fills) for the initial epoch and step right after the
    callbacks' `on_train_begin`; Keras 3's `fit` reads `model._initial_epoch`
    at the same moment. The step stays 0: the already-trained batches of the
    interrupted epoch are pulled from the iterator by `Checkpoint`, as under
    Keras 3, so that the data the next batch trains on is the right one.
    """

    def __init__(self, epoch):
        self.epoch = epoch

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch,
                                              initial_epoch, mode=None):
        del steps_per_epoch, initial_epoch, mode
        return self.epoch, 0


def set_initial_epoch(model, epoch):
    """Makes the running `fit` start at `epoch` (Keras 3 and tf_keras)."""
    model._initial_epoch = epoch
    if is_legacy_model(model):
        model._training_state = _ResumePosition(epoch)


def clear_initial_epoch(model):
    model._initial_epoch = None
    if isinstance(getattr(model, "_training_state", None), _ResumePosition):
        model._training_state = None


def local_value(variable):
    """The copy of `variable` this process holds, read without collectives.

    Reading a distributed variable in cross-replica context can aggregate it
    across replicas: for an `ON_READ` variable under
    `MultiWorkerMirroredStrategy` (batch-norm moving statistics in tf_keras)
    that is an all-reduce every worker must join, so a chief-only save would
    hang. In a multi-worker job the first local replica's copy is saved
    instead (a mirrored variable's copies are all equal anyway); on one host
    the variable is read as before.
    """
    if isinstance(variable, tf.distribute.DistributedValues) and (
        _in_multi_worker_mode(getattr(variable, "distribute_strategy", None))
    ):
        return variable.values[0]
    return variable


def _in_multi_worker_mode(strategy):
    extended = getattr(strategy, "extended", None)
    in_mode = getattr(extended, "_in_multi_worker_mode", None)
    return bool(in_mode and in_mode())


def _coordination_service_enabled():
    from tensorflow.python.eager import context

    return context.context().coordination_service is not None


@dataclasses.dataclass(frozen=True)
class _Task:
    task_type: str
    task_index: int
    worker_id: int  # 0..num_workers-1, the chief first
    num_workers: int

    @property
    def name(self):
        return f"{self.task_type}:{self.task_index}"


def _task_of(strategy):
    """This task's place among the training workers of `strategy`."""
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_index = resolver.task_type, int(resolver.task_id or 0)
    chiefs = len(cluster.get("chief") or ())
    workers = len(cluster.get("worker") or ())
    worker_id = task_index if task_type == "chief" else chiefs + task_index
    return _Task(task_type, task_index, worker_id, chiefs + workers)


class Cluster:
    """This process's part in the training job, and agreement with the rest.

    Created with the detected `Platform` (which reads `TF_CONFIG`), refined
    by `begin(model)` from the model's `tf.distribute` strategy at the start
    of each `fit`. Single-process training (no strategy, `MirroredStrategy`,
    `OneDeviceStrategy`) is a cluster of one chief.
    """

    _fits = 0  # multi-worker fits in this process, the same on every worker

    def __init__(self, platform=None):
        self.is_chief = True if platform is None else bool(platform.is_chief)
        self.task = None  # _Task under MultiWorkerMirroredStrategy
        self._prefix = None
        self._temp_dirs = []
        self._reset_preemption()

    def _reset_preemption(self):
        self._save_at = None
        self._announced = False
        self._watcher = None
        self._watch_lock = threading.Lock()

    # -- roles ------------------------------------------------------------
    @property
    def coordinated(self):
        """Whether decisions are agreed with other workers."""
        return self._prefix is not None

    @property
    def writes(self):
        """Whether this process writes checkpoints and mirrors them."""
        return self.is_chief

    def begin(self, model, log=None):
        """Detects the model's strategy at the start of `fit`."""
        self._reset_preemption()
        strategy = getattr(model, "distribute_strategy", None) or (
            tf.distribute.get_strategy()
        )
        if not _in_multi_worker_mode(strategy):
            self.task, self._prefix = None, None
            return self
        self.task = _task_of(strategy)
        self.is_chief = self.task.worker_id == 0
        if _coordination_service_enabled():
            Cluster._fits += 1
            self._prefix = f"{_KEY_ROOT}/fit-{Cluster._fits}"
        else:
            self._prefix = None
        if log is not None:
            role = ("the chief: writes checkpoints, mirrors and exports"
                    if self.is_chief else
                    "not the chief: writes no checkpoint, restores the chief's")
            log(f"keras_ckpt: worker {self.task.name} "
                f"({self.task.worker_id + 1} of {self.task.num_workers}) is "
                f"{role}.")
        return self

    # -- coordination service key-value store ------------------------------
    def _key(self, name):
        return f"{self._prefix}/{name}"

    def _set(self, name, value):
        """Sets a key once; returns False if another worker set it first."""
        from tensorflow.python.eager import context

        try:
            context.context().set_config_key_value(self._key(name), value)
        except tf.errors.AlreadyExistsError:
            return False
        return True

    def _get(self, name, timeout):
        """The key's value, waiting up to `timeout` s (None on timeout)."""
        from tensorflow.python.eager import context

        try:
            return context.context().get_config_key_value(
                self._key(name), max(1, int(timeout * 1000)))
        except tf.errors.DeadlineExceededError:
            return None

    # -- resume -----------------------------------------------------------
    def find_resume_checkpoint(self, resume, store, uploader, retention):
        """(manifest, store, origin) every worker restores, or None.

        The chief (or a single process) picks as `sources` does; under a
        coordinated cluster it publishes its pick and the other workers read
        that very checkpoint. A worker that is not the chief never writes to
        `store` (the checkpoint directory): what it downloads goes to a
        private temporary directory, deleted once read.
        """
        from keras_ckpt import sources
        from keras_ckpt.errors import CheckpointNotFoundError

        if self.is_chief:
            if not self.coordinated:
                return sources.find_resume_checkpoint(
                    resume, store, uploader, retention)
            try:
                found = sources.find_resume_checkpoint(
                    resume, store, uploader, retention)
                if found is not None and not _is_branch(resume):
                    self._ensure_mirrored(found, store, uploader, retention)
            except Exception as e:
                self._set("resume", json.dumps({"error": str(e)}))
                raise
            self._set("resume", json.dumps(_describe_pick(found, resume)))
            return found
        if not self.coordinated:
            # A non-chief task outside MultiWorkerMirroredStrategy trains on
            # its own: it resumes as the chief would, without writing.
            return self._disposable(sources.find_resume_checkpoint(
                resume, store, uploader, retention,
                download_dir=self._temp_dir()))
        value = self._get("resume", AGREEMENT_TIMEOUT_SECONDS)
        if value is None:
            raise TimeoutError(
                f"keras_ckpt: worker {self.task.name} waited "
                f"{AGREEMENT_TIMEOUT_SECONDS:.0f} s for the chief to choose "
                "the checkpoint to resume from.")
        pick = json.loads(value)
        if "error" in pick:
            raise CheckpointNotFoundError(
                f"Worker {self.task.name} cannot resume: the chief failed to "
                f"choose a checkpoint: {pick['error']}")
        return self._find_chiefs_pick(pick, store, uploader, retention)

    def _ensure_mirrored(self, found, store, uploader, retention):
        """Uploads the chief's local pick if the mirror lacks it.

        Workers on other machines read the mirror; a checkpoint committed
        locally whose upload the previous crash cut short is completed first.
        """
        manifest, found_store, _ = found
        if uploader is None or found_store.directory != store.directory:
            return
        complete = {i.name for i in uploader.list_checkpoints() if i.complete}
        if manifest.name in complete:
            return
        manifests = store.manifests()
        keep = retention.select(manifests) | {manifest.name}
        kept = [m.name for m in manifests if m.name in keep]
        uploader.mirror(store.directory, manifest.name, kept)

    def _find_chiefs_pick(self, pick, store, uploader, retention):
        from keras_ckpt import sources
        from keras_ckpt.errors import CheckpointNotFoundError

        name = pick.get("name")
        if name is None:
            return None
        if pick.get("branch"):
            found = sources.find_resume_checkpoint(
                pick["branch"], store, None, retention,
                download_dir=self._temp_dir())
        else:
            found = None
            manifest = store.get(name)
            if manifest is not None and (
                manifest.timestamp == pick.get("timestamp")  # not a stale one
            ):
                found = (manifest, store, store.prefix(name))
            elif uploader is not None:
                manifest, temp_store = sources.fetch_remote(
                    uploader, name, self._temp_dir(), retention)
                found = (manifest, temp_store, f"{uploader.url}/{name}")
            if found is None:
                raise CheckpointNotFoundError(
                    f"Worker {self.task.name} cannot read checkpoint {name}, "
                    f"which the chief resumes from: it is not (the same) in "
                    f"{store.directory} and there is no `mirror`. Put "
                    "`directory` on storage every worker reads, or set "
                    "`mirror` (every worker reads it)."
                )
        found = self._disposable(found)
        if found[0].timestamp != pick.get("timestamp"):
            raise CheckpointNotFoundError(
                f"Worker {self.task.name} found a checkpoint {name} at "
                f"{found[2]} that is not the one the chief resumes from "
                "(different timestamp). Give this run its own `directory` "
                "and `mirror`."
            )
        return found

    def _temp_dir(self):
        """A private directory for downloads, created only when one happens
        (so that a worker killed before leaves nothing behind)."""
        path = os.path.join(
            tempfile.gettempdir(),
            f"keras_ckpt-{self._task_slug()}-{uuid.uuid4().hex[:12]}")
        self._temp_dirs.append(path)
        return path

    def _task_slug(self):
        if self.task is None:
            return "worker"
        return f"{self.task.task_type}{self.task.task_index}"

    def _disposable(self, found):
        """Deletes a temporary download as soon as its tensors are read."""
        if found is None:
            return None
        manifest, found_store, origin = found
        for temp in self._temp_dirs:
            if _is_within(found_store.directory, temp):
                found_store = _ReadOnceStore(found_store.directory, temp)
                break
        return manifest, found_store, origin

    # -- preemption -------------------------------------------------------
    def preemption_due(self, handler, step):
        """Whether to save and stop at this batch boundary (step `step`).

        A single process stops as soon as its own handler has a request. In
        a coordinated cluster every worker stops at the step agreed through
        the coordination service (see the module docstring).
        """
        if not self.coordinated:
            return handler.requested
        self._watch(handler)
        if handler.requested and self._save_at is None and not self._announced:
            self._announce(handler, step)
        return self._save_at is not None and step >= self._save_at

    def _watch(self, handler):
        with self._watch_lock:
            if self._watcher is not None:
                return
            self._watcher = threading.Thread(
                target=self._watch_preemption, args=(handler,),
                name="keras_ckpt-preemption-peers", daemon=True)
            self._watcher.start()

    def _watch_preemption(self, handler):
        from tensorflow.python.eager import context

        try:
            value = context.context().get_config_key_value(
                self._key("preempt"), 0)
        except tf.errors.OpError:  # the cluster is going down
            return
        if value == _STOP:
            return
        notice = json.loads(value)
        self._save_at = int(notice["step"])
        if not handler.requested:
            handler.request(f"{PREEMPTION_REASON_PEER} {notice['by']}")
        self._set(f"ack/{self.task.worker_id}", "1")

    def _announce(self, handler, step):
        """Tells every worker to save after step `step + 1`, and waits."""
        self._announced = True
        target = step + 1
        notice = json.dumps({"step": target, "by": self.task.name,
                             "reason": handler.reason})
        if not self._set("preempt", notice):
            return  # another worker was preempted first; its target holds
        self._save_at = target
        deadline = time.monotonic() + (handler.remaining() or 0.0)
        for worker in range(self.task.num_workers):
            left = deadline - time.monotonic()
            if left <= 0 or self._get(f"ack/{worker}", left) is None:
                break

    def preemption_saved(self, handler, checkpoint_name):
        """After the preemption save: the chief announces its commit, the
        other workers wait for it (so none exits before it is durable)."""
        if not self.coordinated:
            return
        try:
            if self.is_chief:
                self._set("preemption-saved", checkpoint_name or "")
            else:
                self._get("preemption-saved",
                          max(handler.remaining() or 0.0, 1.0))
        except tf.errors.OpError:  # the chief is gone: nothing to wait for
            pass

    # -- end of fit -------------------------------------------------------
    def end(self, final_name=None, timeout=None):
        """Ends the run: the chief announces its final commit (the other
        workers wait for it), watchers stop, temporary dirs are deleted."""
        try:
            if self.coordinated:
                if self.is_chief:
                    self._set("final", final_name or "")
                else:
                    self._get("final", timeout or AGREEMENT_TIMEOUT_SECONDS)
                self._set("preempt", _STOP)  # releases every watcher
                if self._watcher is not None:
                    self._watcher.join(timeout=5.0)
        except tf.errors.OpError:
            pass  # a worker already left the cluster; nothing to agree on
        finally:
            self._remove_temp_dirs()
            self._watcher = None

    def _remove_temp_dirs(self):
        for path in self._temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._temp_dirs = []


def _is_branch(resume):
    return isinstance(resume, (str, os.PathLike)) and resume not in (
        "latest", "best")


def _describe_pick(found, resume):
    if found is None:
        return {"name": None}
    manifest, _, origin = found
    return {
        "name": manifest.name,
        "timestamp": manifest.timestamp,
        "branch": origin if _is_branch(resume) else None,
    }


def _is_within(path, root):
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root + os.sep)


class _ReadOnceStore(manager_lib.LocalCheckpoints):
    """A downloaded copy that deletes itself once its tensors are read, so
    that even a worker killed later leaves no temporary files behind."""

    def __init__(self, directory, temp_root):
        super().__init__(directory)
        self._temp_root = temp_root

    def read_arrays(self, manifest, verify=False):
        try:
            return super().read_arrays(manifest, verify=verify)
        finally:
            shutil.rmtree(self._temp_root, ignore_errors=True)
