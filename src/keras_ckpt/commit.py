"""The save protocol of a training run, one checkpoint at a time.

`Committer.save()` is what the background writer runs for every save:

1. confirm this job still holds the writer lease of the directory and of
   the mirror (`lease.py`): a job that was taken over stops here;
2. write and commit the checkpoint locally (data -> index -> manifest, see
   `manager.py`), numbered after every checkpoint the directory or the
   mirror holds, so the newest commit is always the latest, also when the
   run branched from an older checkpoint;
3. decide what to keep over the union of what the directory and the mirror
   hold (a fresh machine never deletes the mirror's best or its archives),
   and apply it locally: pointer, then deletions;
4. mirror: upload the new checkpoint, upload again any kept one the mirror
   lacks (healing an upload cut short), point the mirror at the complete
   ones, delete the rest (`Uploader.mirror()`).

A mirror that fails after its retries either stops training
(`on_mirror_error="raise"`) or is left behind while training goes on with
local checkpoints (`"continue"`): later saves probe it cheaply and, once it
answers, the next save uploads every kept checkpoint it lacks.
"""

import logging
import time
import urllib.parse

from keras_ckpt import lease as lease_lib
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import StorageError

logger = logging.getLogger("keras_ckpt")

ON_MIRROR_ERROR = ("raise", "continue")


class Committer:
    """Commits checkpoints to a local directory and its mirror.

    Args:
        store: `manager.LocalCheckpoints`, the local directory.
        uploader: `Uploader` or None, the mirror.
        policy: `manager.RetentionPolicy`.
        on_mirror_error: `"raise"` or `"continue"`, see `Checkpoint`.
    """

    def __init__(self, store, uploader, policy, on_mirror_error="continue"):
        self.store = store
        self.uploader = uploader
        self.policy = policy
        self.on_mirror_error = on_mirror_error
        self._leases = []
        self._down_since = None  # monotonic time the mirror failed
        self.unmirrored = []  # committed locally while the mirror was down
        # Seconds the last save spent writing locally and uploading, for
        # `Checkpoint.stats`.
        self.last_timings = {"write": None, "upload": None}

    # -- writer leases --------------------------------------------------
    def begin(self):
        """Takes over the directory and the mirror from any earlier writer.

        Called when training starts, before the checkpoint to resume from is
        chosen, so that a second job never reads a checkpoint the first one
        is still writing around.
        """
        from keras_ckpt.uploaders.local import LocalUploader

        job = lease_lib.describe_job()
        self.store.ensure_directory()
        local = LocalUploader(
            "file://" + urllib.parse.quote(self.store.directory))
        self._leases = [lease_lib.Lease(local, job, self.store.directory)]
        if self.uploader is not None:
            self._leases.append(
                lease_lib.Lease(self.uploader, job, self.uploader.url))
        for lease in self._leases:
            lease.acquire()

    def _confirm_local(self):
        if self._leases:
            self._leases[0].confirm()

    def _confirm_mirror(self):
        if len(self._leases) > 1:
            self._leases[1].confirm()

    # -- saving ---------------------------------------------------------
    def save(self, snapshot, *, step, epoch, batch, metrics=None,
             history=None, metadata=None):
        """Writes, commits, retains and mirrors one checkpoint.

        Returns:
            `(manifest, mirrored)`: the committed checkpoint's `Manifest`,
            and whether the mirror has it.
        """
        self._confirm_local()
        remote, mirror_error = self._remote_manifests()
        # None: no mirror, or one still down (what it holds is unknown, so
        # it is left alone until a save finds it answering).
        remote_names = (None if remote is None
                        else {m.name for m in remote})
        remote = remote or []
        taken = {m.name for m in remote} | set(self.store.names())
        number = max([int(step)] + [manifest_lib.step_of(n) + 1 for n in taken])
        start = time.perf_counter()
        self.last_timings = {"write": None, "upload": None}
        manifest = self.store.write(
            snapshot, step=step, epoch=epoch, batch=batch, metrics=metrics,
            history=history, metadata=metadata,
            name=manifest_lib.checkpoint_name(number),
        )
        self.last_timings["write"] = time.perf_counter() - start
        try:
            self._confirm_local()
        except Exception:
            # Taken over while writing: this checkpoint must not become the
            # other job's latest. Deleted only while it is still ours (the
            # other job may have committed one of the same name since).
            if self.store.get(manifest.name) == manifest:
                self.store.delete(manifest.name)
            raise
        local = self.store.manifests()
        union = {m.name: m for m in remote}
        union.update((m.name, m) for m in local)
        ordered = sorted(union.values(),
                         key=lambda m: manifest_lib.step_of(m.name))
        keep = self.policy.select(ordered)
        kept_local = self.store.retain(self.policy, keep=keep)
        if mirror_error is not None:
            # Raised only now: the checkpoint is committed locally first.
            self._mirror_failed(mirror_error)
            self.unmirrored.append(manifest.name)
            return manifest, False
        if remote_names is None:
            if self.uploader is not None:
                self.unmirrored.append(manifest.name)
            return manifest, False
        start = time.perf_counter()
        mirrored = self._mirror(manifest, keep, ordered, kept_local,
                                remote_names)
        self.last_timings["upload"] = time.perf_counter() - start
        return manifest, mirrored

    def _remote_manifests(self):
        """`(complete manifests, error)` of the mirror: (None, None) without
        one or while it is down, (None, StorageError) if it just failed.

        Also confirms the mirror's writer lease: a job that was taken over
        stops before it writes anything.
        """
        if self.uploader is None or not self._mirror_usable():
            return None, None
        try:
            self._confirm_mirror()
            return self.uploader.complete_manifests(), None
        except StorageError as e:
            return None, e

    def _mirror_usable(self):
        if self._down_since is None:
            return True
        return self.uploader.reachable()

    def _mirror(self, manifest, keep, ordered, kept_local, remote):
        local_names = {m.name for m in kept_local}
        try:
            self._confirm_mirror()
            names = [m.name for m in ordered if m.name in keep
                     and (m.name in remote or m.name in local_names)]
            stamps = [m.timestamp for m in ordered if m.name in names]
            self.uploader.mirror(
                self.store.directory, manifest.name, names, stamps)
            # Checkpoints kept only by keep_every_n_hours move to the
            # store's archive class, if the user chose one.
            self.uploader.archive(
                [n for n in self.policy.archives(ordered) if n in names])
        except StorageError as e:
            self._mirror_failed(e)
            self.unmirrored.append(manifest.name)
            return False
        if self._down_since is not None:
            logger.warning(
                "keras_ckpt: the mirror %s answers again after %.0f s; it "
                "now holds every kept checkpoint (uploaded: %s).",
                self.uploader.url, time.monotonic() - self._down_since,
                ", ".join(n for n in self.unmirrored if n in names) or "none",
            )
            self._down_since = None
            self.unmirrored = []
        return True

    def _mirror_failed(self, error):
        if self.on_mirror_error == "raise":
            raise error
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "keras_ckpt: the mirror %s failed (%s). Training continues "
                "with checkpoints in %s only (on_mirror_error=\"continue\"); "
                "every save retries the mirror until it answers, then uploads"
                " what it lacks.", self.uploader.url, error,
                self.store.directory,
            )
