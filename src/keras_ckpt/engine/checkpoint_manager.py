"""`keras_ckpt.CheckpointManager`: the engine both faces drive.

It owns what a checkpoint holds (the model, its optimizers and RNG states,
the `state=` objects, the data position), where it goes (the directory, the
optional mirror), when a save happens (a `SavePolicy`, preemption, Ctrl-C),
which checkpoints are kept (a retention policy), how it is written (a
snapshot on the training thread, the commit protocol on a background thread)
and the resume. A face tells it what the training loop did; the `Checkpoint`
callback is the face of Keras' `fit`.

The order of the calls of a run:

```
start(epoch_iterator) -> [epoch_begin(epoch)
    -> (batch_begin(batch) -> batch_end(batch, logs))* -> epoch_end(epoch, logs)]*
    -> finalize(logs) -> end()
```

`batch_begin`/`epoch_begin` are the quiet points where a requested save, a
preemption or an interrupt is handled: no part of the training state is
mid-update there.
"""

import collections
import logging
import os
import signal
import sys
import threading
import time
import typing
import warnings

from keras_ckpt import _args
from keras_ckpt import _keras_compat as compat
from keras_ckpt import distribute
from keras_ckpt import manager as manager_lib
from keras_ckpt import sources
from keras_ckpt._format import human_size
from keras_ckpt.engine import commit as commit_lib
from keras_ckpt.engine import policies
from keras_ckpt.engine import resume as resume_lib
from keras_ckpt.engine import state as state_lib
from keras_ckpt.engine import writer as writer_lib
from keras_ckpt.save_stats import SaveStats

logger = logging.getLogger("keras_ckpt")

PREEMPTION = ("exit", "stop", None)
PREEMPTED_EXIT_CODE = 143
# The end-of-run flush says what it waits for after this many seconds, then
# again every FLUSH_PROGRESS_EVERY s (in place on a terminal).
FLUSH_QUIET_SECONDS = 2.0
FLUSH_PROGRESS_EVERY = 10.0
_FLUSH_POLL_SECONDS = 0.25


class Position(typing.NamedTuple):
    """Where training continues: the global step (batches trained across
    restarts), the epoch and the batch within it (0-based)."""

    step: int
    epoch: int
    batch: int


class CheckpointManager:
    """Saves a training state on a policy and resumes it exactly.

    The engine under `keras_ckpt.Checkpoint`, named after
    `tf.train.CheckpointManager` and Orbax's `CheckpointManager`, which own
    the same things: a directory, when to save, what to keep. A custom
    training loop drives it directly; `fit` drives it through the callback.

    Args:
        directory: str or None, the local working directory. None uses the
            detected platform's preset (`KERAS_CKPT_DIR` overrides it), else
            `./checkpoints`.
        mirror: str, path, `Store` or None, where every committed checkpoint
            is copied in the background (see `keras_ckpt.Checkpoint`).
        model: the `keras.Model` whose variables, optimizer and RNG states
            are saved. May be set later (`manager.model = model`).
        state: dict or None, `{"name": obj}` of extra state to save.
        save_policy: `SavePolicy` or None: when to save (e.g.
            `SaveEveryNSteps(500) | SaveEveryNSeconds(600)`). None saves at epoch
            ends. Defaults to None.
        keep: keep rule(s) (`KeepLast(3) | KeepBest(1, monitor="val_loss")`)
            or a `RetentionPolicy`. None keeps the newest 3.
        resume: `True`/`"latest"`, `"best"`, `False`, or a path/URL of a
            checkpoint or directory to branch from. Defaults to True.
        async_save: bool, write on a background thread. Defaults to True.
        when_busy: `"wait"` or `"skip"`: a save while the previous one is
            still being written. Defaults to `"wait"`.
        flush_timeout: float or None, seconds `close()` waits for pending
            writes and uploads. Defaults to None (no limit).
        on_preemption: `"exit"`, `"stop"` or None. On SIGTERM (or a cloud
            notice), save at the next step and flush, then exit with status
            143 (`"exit"`) or set `reached_preemption` (`"stop"`).
            Defaults to `"exit"`.
        preemption_grace_seconds: float, the budget from the signal to
            exit. Defaults to 25.
        preemption_watch: None, `"auto"` or a tuple of `"gce"`, `"ec2"`,
            `"azure"`: metadata servers to poll. Defaults to None.
        preemption_poll_interval: float, seconds between two polls.
            Defaults to 5.
        on_mirror_error: `"continue"` or `"raise"` when the mirror fails
            after its retries. Defaults to `"continue"`.
        save_on_interrupt: bool, commit a checkpoint on Ctrl-C before
            raising `KeyboardInterrupt`. Defaults to True.
        verbose: 0 or 1: log each save and what a resume restored.
            Defaults to 1.

    A custom loop calls `restore_or_initialize()` once (it returns the
    `Position` to continue from), `step()` after every training step (it
    saves when `save_policy` says so, in the background, and handles a
    preemption notice or Ctrl-C), optionally `end_epoch()`, and `close()` at
    the end (the final checkpoint, flushed). Put the optimizers and a
    `tf.data` iterator in `state=`: the iterator is saved at its position
    and restored there.

    Example:

    ```python
    optimizer.build(model.trainable_variables)  # its slots exist to restore
    iterator = iter(dataset)
    manager = keras_ckpt.CheckpointManager(
        "checkpoints", model=model,
        state={"optimizer": optimizer, "data": iterator},
        save_policy=keras_ckpt.SaveEveryNSteps(500)
        | keras_ckpt.SaveEveryNSeconds(600),
        keep=keras_ckpt.KeepLast(3))
    start = manager.restore_or_initialize()
    for step in range(start.step, total_steps):
        loss = train_step(*next(iterator))
        manager.step({"loss": float(loss)})
        if manager.reached_preemption:  # with on_preemption="stop"
            break
    manager.close()
    ```
    """

    def __init__(
        self,
        directory=None,
        mirror=None,
        *,
        model=None,
        state=None,
        save_policy=None,
        keep=None,
        resume=True,
        async_save=True,
        when_busy="wait",
        flush_timeout=None,
        on_preemption="exit",
        preemption_grace_seconds=25.0,
        preemption_watch=None,
        preemption_poll_interval=5.0,
        on_mirror_error="continue",
        save_on_interrupt=True,
        verbose=1,
    ):
        if save_policy is None:
            save_policy = policies.SaveAtEpochEnd()
        if not isinstance(save_policy, policies.SavePolicy):
            _args.invalid("save_policy", save_policy,
                          "a SavePolicy such as keras_ckpt.SaveEveryNSteps(100)")
        retention = policies.retention_policy(
            policies.KeepLast(3) if keep is None else keep)
        check_optional_positive("flush_timeout", flush_timeout)
        if preemption_grace_seconds is None:
            _args.invalid("preemption_grace_seconds", None,
                          "a positive number")
        check_optional_positive(
            "preemption_grace_seconds", preemption_grace_seconds)
        check_resume(resume)
        if resume == "best" and retention.monitor is None:
            raise ValueError(
                'Invalid value for argument `resume`. resume="best" needs '
                "`monitor` (e.g. monitor='val_loss')."
            )
        _args.check_choice("when_busy", when_busy, writer_lib.WHEN_BUSY)
        _args.check_choice("on_preemption", on_preemption, PREEMPTION)
        if not isinstance(save_on_interrupt, bool):
            _args.invalid("save_on_interrupt", save_on_interrupt,
                          "True or False")
        check_optional_positive(
            "preemption_poll_interval", preemption_poll_interval)
        if preemption_watch is not None:
            from keras_ckpt.preemption import validate_watch

            validate_watch(preemption_watch, "preemption_watch")
        if on_mirror_error not in commit_lib.ON_MIRROR_ERROR:
            _args.invalid("on_mirror_error", on_mirror_error,
                          '"continue" or "raise"')
        if not isinstance(async_save, bool):
            _args.invalid("async_save", async_save, "True or False")
        if verbose not in (0, 1, 2, True, False):
            _args.invalid("verbose", verbose, "0 or 1")

        paths = sources.resolve_paths(directory, mirror)
        self.platform = paths.platform
        self.directory = paths.directory
        self.uploader = paths.uploader
        sources.check_local_directory(self.directory, argument="directory")

        self.model = model
        self.save_policy = save_policy
        self.retention = retention
        self.monitor = retention.monitor
        self.resume = resume
        self.async_save = async_save
        self.when_busy = when_busy
        self.flush_timeout = flush_timeout
        self.on_preemption = on_preemption
        self.preemption_grace_seconds = float(preemption_grace_seconds)
        self.preemption_watch = preemption_watch
        self.preemption_poll_interval = preemption_poll_interval
        self.on_mirror_error = on_mirror_error
        self.save_on_interrupt = save_on_interrupt
        self.verbose = int(verbose)
        self.entries = state_lib.parse_state_argument(state)
        self.stats = []
        self.preempted = False
        self.restored = None  # CheckpointInfo of the checkpoint resumed from
        self.last_saved = None  # Manifest of the newest committed checkpoint
        # What the face tells the engine about its loop.
        self.epochs = None  # the planned epochs, for "epoch 3/8" in the logs
        self.progress_bar = False  # a progress bar line to end before a log
        self.stats_writer = None  # gets each save's SaveStats (TensorBoard)
        self.stop_training = None  # on_preemption="stop": ends the loop
        self.on_abort = None  # undoes the face's run after Ctrl-C
        self.before_save = None  # e.g. flushes loggers up to the checkpoint
        self._store = manager_lib.LocalCheckpoints(self.directory)
        self._committer = commit_lib.Committer(
            self._store, self.uploader, self.retention, on_mirror_error)
        self._writer = writer_lib.BackgroundWriter()
        self._cluster = distribute.Cluster(self.platform)
        self.reset()

    # ------------------------------------------------------------------
    # Run state
    # ------------------------------------------------------------------
    def reset(self):
        """Forgets the previous run's position (a new run starts)."""
        self._metadata = None  # sources.metadata(model), once per run
        self._epoch = 0
        self._batch = 0  # batches of self._epoch already trained
        self._step = 0  # global batch count
        self._since_save = 0
        self._last_save_time = time.monotonic()
        self._pending = None  # logs of a requested save, taken at a quiet point
        self._saved_step = None
        self._history = {}
        self._history_epochs = []
        self._preemption = None
        self._ended_epoch = None
        self._finalized = False
        self._monitor_checked = False
        self._interrupt = None  # the SIGINT handler while the run lasts
        self._interrupted = False
        self._reports = collections.deque()  # finished saves, to log
        self._data = state_lib.DataPosition()
        # What this run resumed (empty for a fresh start) and what of it is
        # still to apply: see resume.py.
        self._resume = resume_lib.Resume(log=self._print)
        self.preempted = False
        self.stats = []

    @property
    def training_state(self):
        return state_lib.TrainingState(self.model, self.entries)

    @property
    def resumed(self):
        """The `resume.Resume` of this run (what it restored, what is
        still to apply)."""
        return self._resume

    @property
    def interrupted(self):
        """Ctrl-C was pressed during this run."""
        return self._interrupted

    # ------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------
    def start(self, epoch_iterator=None, fit=True):
        """Starts a run: checks the stores, resumes, installs the handlers.

        `epoch_iterator` is `fit`'s running `EpochIterator` (None when
        there is none); `fit` is False for a custom loop.
        """
        self._cluster.begin(
            self.model, log=compat.print_msg if self.verbose else None)
        self._writer.check_for_errors()
        if self.uploader is not None:
            self.uploader.check()
        if self._cluster.writes:
            self._store.ensure_directory()
            self._committer.begin()
        self._log_platform()
        if epoch_iterator is not None:
            resume_lib.check_input(self._data.attach(epoch_iterator))
        self._restore_at_start(epoch_iterator, fit)
        self._install_preemption()
        self._install_interrupt()

    def epoch_begin(self, epoch):
        self._report_saves()
        self._epoch = epoch
        self._batch = 0 if self._resume.skip_until is None else self._batch
        self._data.on_epoch_begin()
        # Callbacks that are not in fit's list never ran on_train_begin.
        self._resume.finish_pending(self.model, self.training_state,
                                    self._history_epochs, self._history)
        self._resume.on_epoch_begin()
        self.quiet_point()

    def batch_begin(self, batch):
        if self._resume.hides(batch):
            return
        self.quiet_point()

    def batch_end(self, batch, logs=None):
        """Batch `batch` (0-based, in the epoch) was trained."""
        done = batch + 1
        if done <= self._batch:
            return  # a batch skipped on resume: trained before the restart
        self._step += done - self._batch
        self._since_save += done - self._batch
        self._batch = done
        self._resume.trained()
        if self._policy_says(policies.STEP):
            self._pending = dict(logs or {})

    def epoch_end(self, epoch, logs):
        """Epoch `epoch` ended with `logs` (a reference: later callbacks
        may still add to it before the next quiet point takes it)."""
        self._resume.trained()
        self._epoch = epoch + 1
        self._batch = 0
        if self.preempted:
            return
        self._ended_epoch = (epoch, logs)
        if self._pending is not None or self._policy_says(policies.EPOCH_END):
            self._pending = logs

    def _policy_says(self, kind):
        return self.save_policy.should_save(policies.SaveEvent(
            kind, self._since_save, time.monotonic() - self._last_save_time))

    def _record_epoch(self):
        if self._ended_epoch is None:
            return
        epoch, logs = self._ended_epoch
        self._ended_epoch = None
        self._history_epochs.append(epoch)
        for key, value in logs.items():
            self._history.setdefault(key, []).append(_to_float(value))

    def finalize(self, logs=None):
        """Commits the final checkpoint and waits for pending writes.
        Does nothing the second time in a run."""
        if self._finalized:
            return
        self._finalized = True
        self._resume.finish_pending(self.model, self.training_state,
                                    self._history_epochs, self._history)
        self._record_epoch()
        if not self.preempted:
            final_logs = self._pending if self._pending is not None else (
                dict(logs or {})
            )
            if self._step != self._saved_step:
                self._save_now(final_logs, when_busy="wait")
        self._check_monitor_logged()
        self._flush(self.flush_timeout)
        self._warn_unmirrored()
        self._report_saves()

    def end(self):
        """Undoes what `start` installed; also after Ctrl-C."""
        try:
            self._report_saves()
        finally:
            self._uninstall_interrupt()
            if self.stats_writer is not None:
                self.stats_writer.close()
                self.stats_writer = None
            self._uninstall_preemption()
            self._resume.undo(self.model)
            self._data = state_lib.DataPosition()  # drops the iterators
            self._cluster.end(
                getattr(self.last_saved, "name", None), self.flush_timeout)

    def _warn_unmirrored(self):
        """Names the committed checkpoints the mirror lacks (saved while it
        failed, or whose upload a preemption checkpoint superseded)."""
        missing = self._committer.describe_unmirrored()
        if missing:
            logger.warning("keras_ckpt: %s, or let the next run with this "
                           "mirror upload them.", missing)

    # ------------------------------------------------------------------
    # A custom training loop
    # ------------------------------------------------------------------
    def restore_or_initialize(self):
        """Starts a custom loop's run: resumes or starts afresh.

        Restores the checkpoint `resume` names (the model, the optimizers,
        the RNG states and the `state=` objects, a `tf.data` iterator among
        them positioned at its next batch), checks the stores, takes the
        writer lease and installs the preemption and Ctrl-C handlers. Build
        the model and its optimizers first (`optimizer.build(
        model.trainable_variables)`): a restore only assigns variables that
        exist.

        Returns:
            `Position`: the global step, the epoch and the batch within it
            to continue from (all 0 on a fresh start).
        """
        if self.model is None:
            raise ValueError(
                "Invalid value for argument `model`: CheckpointManager needs "
                "the model to save; pass model=... (or set manager.model) "
                "before restore_or_initialize().")
        self.reset()
        self.start(fit=False)
        self._resume.finish_pending(self.model, self.training_state,
                                    self._history_epochs, self._history)
        return self.position

    @property
    def position(self):
        """`Position` (step, epoch, batch) of the next step to train."""
        return Position(self._step, self._epoch, self._batch)

    @property
    def reached_preemption(self):
        """A preemption notice came and its checkpoint is committed
        (`on_preemption="stop"`): the loop should end now."""
        return self.preempted

    def step(self, logs=None):
        """Counts one trained step of a custom loop, after its update.

        Saves when `save_policy` says so (in the background with
        `async_save`: it returns once the state is snapshotted), and handles
        a preemption notice or a Ctrl-C that came during the step: their
        checkpoint is committed here, then `on_preemption="exit"` exits with
        status 143, `"stop"` sets `reached_preemption`, Ctrl-C raises
        `KeyboardInterrupt`.

        Args:
            logs: dict or None, the step's metrics, stored with a checkpoint
                saved now (what `KeepBest` ranks).

        Returns:
            bool, whether a checkpoint was saved.
        """
        self._step += 1
        self._batch += 1
        self._since_save += 1
        if self._policy_says(policies.STEP):
            self._pending = dict(logs or {})
        return self._save_at_quiet_point()

    def end_epoch(self, logs=None):
        """Ends the current epoch of a custom loop (the next `step` is batch
        0 of the next epoch); saves when `save_policy` says so.

        Returns:
            bool, whether a checkpoint was saved.
        """
        self.epoch_end(self._epoch, dict(logs or {}))
        return self._save_at_quiet_point()

    def _save_at_quiet_point(self):
        self._report_saves()  # a loop has no progress bar to keep whole
        before = self._saved_step
        self.quiet_point()
        return self._saved_step == self._step and before != self._step

    def close(self, logs=None):
        """Commits the final checkpoint, waits for pending writes and
        uploads, and uninstalls the handlers. Raises a background error."""
        try:
            self.finalize(logs)
        finally:
            self.end()

    # ------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------
    def quiet_point(self):
        """A point where no state is mid-update: save, check, preempt."""
        self._writer.check_for_errors()
        self._check_monitor_logged()
        self._record_epoch()
        if self._interrupted:
            self._handle_interrupt()
        if self._preemption is not None and self._cluster.preemption_due(
            self._preemption, self._step
        ):
            self._handle_preemption()
            return
        if self._pending is not None:
            if self.before_save is not None:
                self.before_save()
            self._save_now(self._pending)

    def _save_now(self, logs, synchronous=False, when_busy=None):
        self._pending = None
        self._since_save = 0
        self._last_save_time = time.monotonic()
        if self._step == self._saved_step:
            return
        if not self._cluster.writes:  # only the chief writes checkpoints
            self._saved_step = self._step
            return
        requested = time.perf_counter()
        report = {}  # filled by the job, logged on the training thread
        data = self._data.get_state(self._batch)
        snapshot = self.training_state.snapshot(
            extra=None if data is None else {state_lib.DATA_POSITION: data})
        position = dict(step=self._step, epoch=self._epoch, batch=self._batch)
        history = {"epochs": list(self._history_epochs),
                   "logs": {k: list(v) for k, v in self._history.items()}}
        if self._metadata is None:  # the model's config: once per run
            self._metadata = sources.metadata(self.model)
        metadata = self._metadata
        self._saved_step = self._step

        def job():
            try:
                manifest, mirrored = self._committer.save(
                    snapshot, metrics=logs, history=history,
                    metadata=metadata, **position,
                )
                self.last_saved = manifest
                timings = self._committer.last_timings
                report.update(manifest=manifest, write=timings["write"],
                              mirrored=mirrored)
                if mirrored:
                    report.update(upload=timings["upload"],
                                  lag=time.perf_counter() - requested)
            finally:  # a failed save is raised by check_for_errors
                report["done"] = True

        if self.async_save and not synchronous:
            if not self._writer.submit(job, when_busy=when_busy or self.when_busy):
                self._saved_step = None
                self._log(
                    f"keras_ckpt: skipped the save at step {self._step}: "
                    "the previous checkpoint is still being written.",
                    mid_epoch=True)
                return
        else:
            self._writer.wait_until_finished(self.flush_timeout)
            job()
        report["blocking"] = time.perf_counter() - requested
        self._reports.append(report)

    def _report_saves(self):
        """Logs the saves finished since the last call, records their cost
        in `stats` and writes it to `stats_writer` (on the training
        thread)."""
        records = []
        while self._reports and self._reports[0].get("done"):
            report = self._reports.popleft()
            if "manifest" not in report or "blocking" not in report:
                continue
            manifest = report["manifest"]
            record = SaveStats(
                name=manifest.name, step=manifest.step, epoch=manifest.epoch,
                batch=manifest.batch, bytes=manifest.total_bytes,
                blocking_seconds=report["blocking"],
                write_seconds=report["write"],
                upload_seconds=report.get("upload"),
                mirror_lag_seconds=report.get("lag"),
            )
            records.append(record)
            where = (f" and {self.uploader.url}" if report.get("mirrored")
                     else "")
            self._log(
                f"keras_ckpt: saved {manifest.name} "
                f"({self.describe_position(manifest.epoch, manifest.batch)}, "
                f"{human_size(manifest.total_bytes)}) to {self.directory}"
                f"{where} in {report['write'] + report.get('upload', 0):.2f} s"
            )
        self.stats.extend(records)
        if self.stats_writer is not None:
            self.stats_writer.write(records)

    def describe_position(self, epoch, batch):
        """Keras' 1-based epoch numbers: "end of epoch 8/8", "epoch 3/8,
        batch 20"."""
        total = f"/{self.epochs}" if self.epochs else ""
        if batch == 0 and epoch > 0:
            return f"end of epoch {epoch}{total}"
        return f"epoch {epoch + 1}{total}, batch {batch}"

    def _log(self, message, mid_epoch=False):
        """Prints `message` on a line of its own; `mid_epoch` ends the
        progress bar line first, when there is one."""
        if self.verbose:
            bar = mid_epoch and self.progress_bar
            compat.print_msg(("\n" if bar else "") + message)

    def _print(self, message):
        if self.verbose:
            compat.print_msg(message)

    def _check_monitor_logged(self):
        """Keras' warning for a `monitor` missing from the first epoch's logs."""
        if self.monitor is None or self._monitor_checked:
            return
        logs = self._ended_epoch[1] if self._ended_epoch else None
        if logs is None:
            return
        self._monitor_checked = True
        if self.monitor in logs:
            return
        suggestion = _args.suggestion(self.monitor, list(logs))
        warnings.warn(
            f"keras_ckpt.Checkpoint ranks checkpoints by metric "
            f"`{self.monitor}` which is not available. {suggestion}"
            f"Available metrics are: {','.join(logs)}. keep_best and "
            f'resume="best" will find no checkpoint that logged it.',
            stacklevel=2,
        )

    def _log_platform(self):
        if self.verbose and self.platform is not None and (
            self.platform.name != "local"
        ):
            compat.print_msg(f"keras_ckpt: {self.platform.describe()}")

    # ------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------
    def _restore_at_start(self, epoch_iterator, fit):
        """Resumes from the checkpoint `resume` names (see resume.py)."""
        found = resume_lib.choose_checkpoint(
            self._cluster, self.resume, self._store, self.uploader,
            self.retention)
        if found is None:
            if self.resume is not False:
                self._print(
                    f"keras_ckpt: no checkpoint to resume from in "
                    f"{self.directory}; starting from scratch.")
            return
        manifest = found.manifest
        note = resume_lib.branch_note(self._store, manifest)
        if note and self._cluster.writes:
            self._print(note)
        resume = resume_lib.Resume(found, log=self._print)
        resume.began = self._resume.began
        self._resume = resume
        resume.restore(self.model, self.training_state, self._data,
                       epoch_iterator, fit=fit)
        self._epoch, self._batch, self._step = (
            manifest.epoch, manifest.batch, manifest.step)
        self._saved_step = manifest.step
        history = manifest.history or {}
        self._history_epochs = list(history.get("epochs", []))
        self._history = {k: list(v) for k, v in history.get("logs", {}).items()}
        self.restored = sources.info(manifest, found.store, found.origin)
        self._print(
            f"keras_ckpt: resumed from {found.origin}: step {manifest.step}, "
            + self.describe_position(manifest.epoch, manifest.batch)
            + (f" (skipping the {manifest.batch} batches of epoch "
               f"{manifest.epoch + 1} already trained)"
               if manifest.batch and fit else ""))

    def epoch_batches(self, epoch_iterator, enumerate_epoch):
        """The steps of each epoch that `fit` trains (see `DataPosition`)."""
        return self._resume.epoch_batches(
            self.model, self.training_state, self._data, epoch_iterator,
            enumerate_epoch)

    # ------------------------------------------------------------------
    # Ctrl-C
    # ------------------------------------------------------------------
    def _install_interrupt(self):
        if not self.save_on_interrupt or (
            threading.current_thread() is not threading.main_thread()
        ) or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # only Python's own handler is ours to wrap

        def on_sigint(signum, frame):
            # A second Ctrl-C interrupts at once, as usual.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._interrupted = True
            sys.stderr.write(
                "\nkeras_ckpt: interrupted; saving the current batch before "
                "stopping (press Ctrl-C again to stop without saving).\n")

        self._interrupt = on_sigint
        signal.signal(signal.SIGINT, on_sigint)

    def _uninstall_interrupt(self):
        if self._interrupt is not None:
            if signal.getsignal(signal.SIGINT) is self._interrupt:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            self._interrupt = None

    def _handle_interrupt(self):
        """Commits the current batch, then lets the interrupt propagate."""
        self._interrupted = False
        self._uninstall_interrupt()
        try:
            if self._step != self._saved_step:
                self._save_now(self._pending or {}, synchronous=True)
            self._writer.wait_until_finished(self.flush_timeout)
            if self.last_saved is not None:
                self._log(  # the bar was ended by the SIGINT message
                    f"keras_ckpt: committed {self.last_saved.name} "
                    f"({self.describe_position(self._epoch, self._batch)}) "
                    "before the interrupt; fit() resumes from it.")
        finally:
            (self.on_abort or self.end)()
        raise KeyboardInterrupt

    # ------------------------------------------------------------------
    # Preemption
    # ------------------------------------------------------------------
    def _install_preemption(self):
        if self.on_preemption is None:
            return
        from keras_ckpt import preemption

        self._preemption = preemption.PreemptionHandler(
            grace_seconds=self.preemption_grace_seconds,
            watch=self.preemption_watch,
            poll_interval=self.preemption_poll_interval or 5.0,
            exit_code_at_deadline=(
                PREEMPTED_EXIT_CODE if self.on_preemption == "exit" else None),
            describe_unfinished=self._committer.describe_unmirrored,
        )
        self._preemption.install()

    def _uninstall_preemption(self):
        if self._preemption is not None:
            self._preemption.uninstall()
            self._preemption = None

    def _handle_preemption(self):
        handler = self._preemption
        start = time.monotonic()
        self._log(
            f"keras_ckpt: preemption notice ({handler.reason}); saving at "
            f"{self.describe_position(self._epoch, self._batch)} with "
            f"{handler.remaining():.0f} s left.", mid_epoch=True)
        # The checkpoint about to be saved supersedes the one in flight: its
        # upload stops (its local write, if still running, cannot be cut
        # short), and the preemption checkpoint's upload heals nothing else,
        # so the budget goes to the newest state. The superseded checkpoint
        # stays committed locally; the next run (or `keras-ckpt push`)
        # uploads it.
        supersede = self._step != self._saved_step
        if supersede and self._writer.busy:
            self._committer.cancel_upload()
        self._committer.heal = False
        try:
            self._writer.wait_until_finished(max(handler.remaining(), 0.1))
            self._committer.allow_uploads()
            if supersede:
                self._save_now(self._pending or {}, synchronous=True)
        finally:
            self._committer.heal = True
            self.preempted = True
            self._cluster.preemption_saved(
                handler, getattr(self.last_saved, "name", None))
        if self.verbose:
            compat.print_msg(
                f"keras_ckpt: preemption checkpoint committed in "
                f"{time.monotonic() - start:.2f} s."
            )
        self._warn_unmirrored()
        if self.on_preemption == "exit":
            self._uninstall_preemption()
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if self.stop_training is not None:
            self.stop_training()

    # ------------------------------------------------------------------
    # Flushing
    # ------------------------------------------------------------------
    def wait_until_finished(self, timeout=None):
        """Waits for pending writes and uploads; raises their errors."""
        self._flush(timeout)

    def _flush(self, timeout=None):
        """`wait_until_finished`, saying what is flushed when it is long.

        After `FLUSH_QUIET_SECONDS`, one line names the checkpoint, the
        local write or the upload (to which URL) and what remains; on a
        terminal it is rewritten in place, otherwise printed again every
        `FLUSH_PROGRESS_EVERY` seconds (a few lines in a log at most).
        """
        start = time.monotonic()
        tty = _is_tty(sys.stdout)
        shown = None  # when the last line was printed
        width = 0
        while not self._writer.join(_FLUSH_POLL_SECONDS):
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                break
            if not self.verbose or now - start < FLUSH_QUIET_SECONDS:
                continue
            if not tty and shown is not None and (
                now - shown < FLUSH_PROGRESS_EVERY
            ):
                continue
            activity = self._committer.describe_activity()
            if activity is None:
                continue
            line = (f"keras_ckpt: waiting for pending saves: {activity} "
                    f"(waited {now - start:.0f} s)")
            if tty:
                compat.print_msg("\r" + line.ljust(width), line_break=False)
                width = len(line)
            else:
                compat.print_msg(line)
            shown = now
        if tty and shown is not None:
            compat.print_msg("")
        if self._writer.busy:
            raise writer_lib.still_writing(timeout)
        self._writer.check_for_errors()


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def check_resume(resume):
    expected = 'True, "latest", "best", False, or a checkpoint path/URL'
    if isinstance(resume, bool) or resume in ("latest", "best"):
        return
    if not isinstance(resume, (str, os.PathLike)):
        _args.invalid("resume", resume, expected)
    text = os.fspath(resume)
    if "://" in text or os.path.exists(text):
        return
    hint = _args.suggestion(text, ("latest", "best"))
    if hint:  # "lastest" is a typo, not a directory to branch from
        _args.invalid("resume", resume, expected, hint)


def check_optional_positive(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value <= 0
    ):
        _args.invalid(name, value, "a positive number or None")
