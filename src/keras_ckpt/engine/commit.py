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
import threading
import time

from keras_ckpt import lease as lease_lib
from keras_ckpt import manifest as manifest_lib
from keras_ckpt._format import human_size
from keras_ckpt.errors import StorageError
from keras_ckpt.store.base import UploadCancelled

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
        # Set by `cancel_upload()`: the upload in flight stops before its
        # manifest (a newer checkpoint supersedes it).
        self._cancel = threading.Event()
        # False while a preemption checkpoint is saved: its upload gets the
        # budget; the mirror is healed by a later save.
        self.heal = True
        # What the save in flight is doing, for progress lines and for the
        # message at a preemption deadline (`describe_activity()`).
        self.activity = None
        self._sent_lock = threading.Lock()

    # -- what is in flight ------------------------------------------------
    def cancel_upload(self):
        """Stops the upload of the save in flight before it commits on the
        mirror (its local checkpoint stays committed, listed in
        `unmirrored`). The next `save()` uploads normally."""
        self._cancel.set()

    def allow_uploads(self):
        """Undoes a `cancel_upload()` that found no upload to stop."""
        self._cancel.clear()

    def _start(self, name, phase, total=0, files=()):
        self.activity = {"name": name, "phase": phase, "bytes": int(total),
                         "sent": 0, "files": list(files),
                         "since": time.monotonic()}

    def _sent(self, nbytes):
        activity = self.activity
        if activity is not None:
            with self._sent_lock:
                activity["sent"] += nbytes

    def describe_activity(self):
        """One line: what the save in flight is doing and what remains, or
        None when no save is in flight."""
        activity = self.activity
        if activity is None:
            return None
        elapsed = time.monotonic() - activity["since"]
        name = activity["name"]
        left = max(activity["bytes"] - activity["sent"], 0)
        if activity["phase"] == "write":
            return (f"writing {name} to {self.store.directory}: "
                    f"{human_size(left)} of {human_size(activity['bytes'])} "
                    f"left, {elapsed:.0f} s")
        return (f"uploading {name} to {self.uploader.url}: "
                f"{human_size(left)} of {human_size(activity['bytes'])} left"
                f", {len(self._files_left(activity))} files, "
                f"{elapsed:.0f} s")

    @staticmethod
    def _files_left(activity):
        """Files of the upload in flight not yet sent (sent in order), plus
        the manifest, which goes last."""
        sent, left = activity["sent"], []
        for filename, size in activity["files"]:
            if sent >= size > 0:
                sent -= size
            else:
                sent, left = 0, left + [filename]
        return left

    def describe_unmirrored(self):
        """What the mirror lacks of this run's checkpoints: one sentence
        naming the checkpoints, the files of the one in flight, and the
        `keras-ckpt push` command that completes the mirror; None if
        nothing is missing (or there is no mirror)."""
        activity, parts = self.activity, []
        if activity is not None and activity["phase"] == "write":
            parts.append(f"{activity['name']} (still being written locally,"
                         " not committed: it will not be used)")
        names = list(self.unmirrored)
        if activity is not None and activity["phase"] == "upload":
            names.append(activity["name"])
        if self.uploader is None:
            return "; ".join(parts) or None
        for name in dict.fromkeys(names):
            if activity is not None and name == activity["name"] and (
                activity["phase"] == "upload"
            ):
                files = ", ".join(self._files_left(activity))
                parts.append(f"{name} (committed locally; not uploaded: "
                             f"{files})")
            else:
                parts.append(f"{name} (committed locally, not uploaded)")
        if not parts:
            return None
        return (f"not on the mirror {self.uploader.url}: "
                f"{'; '.join(parts)}. Complete it with `keras-ckpt push "
                f"{self.store.directory} {self.uploader.url}`")

    # -- writer leases --------------------------------------------------
    def begin(self):
        """Takes over the directory and the mirror from any earlier writer.

        Called when training starts, before the checkpoint to resume from is
        chosen, so that a second job never reads a checkpoint the first one
        is still writing around.
        """
        job = lease_lib.describe_job()
        self.store.ensure_directory()
        self._leases = [
            lease_lib.Lease(self.store.store, job, self.store.directory)]
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
        name = manifest_lib.checkpoint_name(number)
        start = time.perf_counter()
        self.last_timings = {"write": None, "upload": None}
        self._start(name, "write", snapshot.nbytes)
        try:
            manifest = self.store.write(
                snapshot, step=step, epoch=epoch, batch=batch,
                metrics=metrics, history=history, metadata=metadata,
                name=name, progress=self._sent,
            )
        finally:
            self.activity = None
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
        files = [(f, int(manifest.files[f]["size"]))
                 for f in manifest_lib.commit_order(manifest.files)]
        self._start(manifest.name, "upload", sum(s for _, s in files),
                    files + [(manifest_lib.manifest_name(manifest.name), 0)])
        try:
            mirrored = self._mirror(manifest, keep, ordered, kept_local,
                                    remote_names)
        finally:
            self.activity = None
            self._cancel.clear()
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
            listed = self.uploader.mirror(
                self.store.directory, manifest.name, names, stamps,
                progress=self._sent, cancel=self._cancel, heal=self.heal)
            # Checkpoints kept only by keep_every_n_hours move to the
            # store's archive class, if the user chose one.
            self.uploader.archive(
                [n for n in self.policy.archives(ordered) if n in names])
        except UploadCancelled:
            logger.info("keras_ckpt: the upload of %s to %s was cancelled: "
                        "a newer checkpoint supersedes it.", manifest.name,
                        self.uploader.url)
            self.unmirrored.append(manifest.name)
            return False
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
        # Still missing: kept checkpoints the mirror's pointer does not list
        # (an upload cancelled by a preemption, not healed yet).
        self.unmirrored = [n for n in self.unmirrored
                           if n in local_names and n not in listed]
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
