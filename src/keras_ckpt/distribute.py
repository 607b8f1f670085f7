"""Distributed training: which worker writes, and agreement between workers.

Everything `Checkpoint` needs to know about `tf.distribute` lives here (the
TF internals it rests on, and the tf_keras shims, are in `_keras_compat`):

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

  * Resume (`resume.choose_checkpoint`): the chief picks the checkpoint (as
    a single worker would) and publishes its name; the other workers restore exactly that one, from
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
import tempfile
import threading
import time
import uuid

import tensorflow as tf

from keras_ckpt import _keras_compat as compat

PREEMPTION_REASON_PEER = "preemption of"
# How long a worker waits for the chief to choose (and maybe download) the
# checkpoint to resume from, and, at the end of `fit`, to commit the final one.
AGREEMENT_TIMEOUT_SECONDS = 1800.0
_KEY_ROOT = "keras_ckpt"
_STOP = "stop"


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
        if not compat.in_multi_worker_mode(strategy):
            self.task, self._prefix = None, None
            return self
        self.task = _task_of(strategy)
        self.is_chief = self.task.worker_id == 0
        if compat.coordination_service_enabled():
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

    def set_key(self, name, value):
        """Sets a key of this fit once; False if another worker set it first."""
        return compat.coordination_set(self._key(name), value)

    def get_key(self, name, timeout):
        """The key's value, waiting up to `timeout` s (None on timeout)."""
        return compat.coordination_get(
            self._key(name), max(1, int(timeout * 1000)))

    # -- private downloads (resume.py) ------------------------------------
    def temp_dir(self):
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

    def temp_root(self, path):
        """The private directory of `temp_dir()` that holds `path`, or None."""
        for temp in self._temp_dirs:
            if _is_within(path, temp):
                return temp
        return None

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
        try:
            value = compat.coordination_get(self._key("preempt"), 0)
        except tf.errors.OpError:  # the cluster is going down
            return
        if value == _STOP:
            return
        notice = json.loads(value)
        self._save_at = int(notice["step"])
        if not handler.requested:
            handler.request(f"{PREEMPTION_REASON_PEER} {notice['by']}")
        self.set_key(f"ack/{self.task.worker_id}", "1")

    def _announce(self, handler, step):
        """Tells every worker to save after step `step + 1`, and waits."""
        self._announced = True
        target = step + 1
        notice = json.dumps({"step": target, "by": self.task.name,
                             "reason": handler.reason})
        if not self.set_key("preempt", notice):
            return  # another worker was preempted first; its target holds
        self._save_at = target
        deadline = time.monotonic() + (handler.remaining() or 0.0)
        for worker in range(self.task.num_workers):
            left = deadline - time.monotonic()
            if left <= 0 or self.get_key(f"ack/{worker}", left) is None:
                break

    def preemption_saved(self, handler, checkpoint_name):
        """After the preemption save: the chief announces its commit, the
        other workers wait for it (so none exits before it is durable)."""
        if not self.coordinated:
            return
        try:
            if self.is_chief:
                self.set_key("preemption-saved", checkpoint_name or "")
            else:
                self.get_key("preemption-saved",
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
                    self.set_key("final", final_name or "")
                else:
                    self.get_key("final", timeout or AGREEMENT_TIMEOUT_SECONDS)
                self.set_key("preempt", _STOP)  # releases every watcher
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


def _is_within(path, root):
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root + os.sep)
