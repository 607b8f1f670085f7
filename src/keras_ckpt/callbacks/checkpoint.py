"""`keras_ckpt.Checkpoint`: save everything, resume exactly."""

import collections
import logging
import os
import signal
import sys
import threading
import time
import warnings
import weakref

import keras

from keras_ckpt import _args
from keras_ckpt import _keras_compat as compat
from keras_ckpt.engine import commit as commit_lib
from keras_ckpt import distribute
from keras_ckpt import manager as manager_lib
from keras_ckpt.engine import resume as resume_lib
from keras_ckpt import sources
from keras_ckpt.engine import state as state_lib
from keras_ckpt.engine import writer as writer_lib
from keras_ckpt._format import human_size
from keras_ckpt.errors import IncompatibleCheckpointError
from keras_ckpt.save_stats import SaveStats
from keras_ckpt.save_stats import TensorBoardScalars

logger = logging.getLogger("keras_ckpt")

_PREEMPTION = ("exit", "stop", None)
# Keras callbacks whose state decides what training does next; left out of
# `state=`, a resumed run would start them afresh.
_STATEFUL_CALLBACKS = ("EarlyStopping", "ReduceLROnPlateau",
                       "LearningRateScheduler", "ModelCheckpoint")
PREEMPTED_EXIT_CODE = 143
# model -> the `Checkpoint` in its current fit(), for `ExportSavedModel`
# (a registry, so that nothing is set on the user's model).
_ATTACHED = weakref.WeakKeyDictionary()


def attached_to(model):
    """The `Checkpoint` callback of `model`'s current (or last) `fit()`, or
    None."""
    return _ATTACHED.get(model)


class Checkpoint(compat.Callback):
    """Saves the complete training state and resumes it exactly.

    Each checkpoint holds the model's variables (including non-trainable ones
    and the dropout RNG states), the optimizer's variables (hence the
    learning-rate schedule position), the metric accumulators, the training
    position (epoch, batch within the epoch, global step), the state of the
    callbacks and objects passed in `state`, the metric history and metadata.
    It is written in `tf.train.CheckpointManager`'s layout plus a manifest
    (`ckpt-<N>.json`) that commits it; a checkpoint whose files are missing or
    truncated is never restored.

    On `fit()`, the latest complete checkpoint in `directory` (or in `mirror`,
    if newer) is restored: training continues in the same epoch at the same
    batch, skipping the batches of the interrupted epoch that were already
    trained on without training on them again. When `fit()` completes, a
    final checkpoint is always committed.

    Args:
        directory: str or None, the local working directory. None uses the
            detected platform's preset (`KERAS_CKPT_DIR` overrides it), else
            `./checkpoints`.
        mirror: str, path, `Uploader` or None. A URL (`s3://bucket/prefix`,
            `gs://...`, `az://container/prefix`, `file:///path`) or a local
            path (a `file://` mirror) that every committed checkpoint is
            copied to in the background. None uses the platform preset
            (`KERAS_CKPT_MIRROR` overrides it).
        save_freq: `"epoch"` or a positive int. Save at the end of every
            epoch, or every N training batches (counted in batches, also with
            `steps_per_execution` > 1). Defaults to `"epoch"`.
        save_every_seconds: float or None. Also save when this much wall time
            has passed since the last save. Defaults to None.
        save_on_epoch_end: bool or None. Also save at the end of every epoch
            when `save_freq` is an int ("every N batches and at each epoch
            end"). None does so exactly when `monitor` is set, so that the
            checkpoints `keep_best`, `resume="best"` and
            `ExportSavedModel(source="best")` rank carry the epoch's metrics
            (`val_*` metrics exist only at epoch ends). Defaults to None.
        max_to_keep: int or None. Keep the newest N checkpoints (None keeps
            all). Defaults to 3.
        keep_every_n_hours: float or None. Also keep one checkpoint in every
            N-hour window. Defaults to None.
        monitor: str or None. Logged metric (e.g. `"val_loss"`) that ranks
            checkpoints for `keep_best` and `resume="best"`. Only checkpoints
            that logged it are ranked; a metric that is not logged at the
            first epoch end is warned about, listing the logged names.
            Defaults to None.
        mode: `"auto"`, `"min"` or `"max"`: whether a lower or a higher
            `monitor` is better. Defaults to `"auto"`.
        keep_best: int. Also keep the best K checkpoints by `monitor`; the
            best value survives restarts. Defaults to 1.
        state: dict or None, `{"name": obj}` of extra state to save: Keras
            callbacks (`EarlyStopping`, `ReduceLROnPlateau`,
            `ModelCheckpoint`, `LearningRateScheduler`), objects with
            `get_state()` / `set_state(dict)`, or TF/Keras variables,
            `tf.random.Generator`s and modules. One of those Keras callbacks
            in `fit()`'s list but not here gets a warning at the start of
            `fit()`: a resumed run would start it afresh. Defaults to None.
        resume: `True`/`"latest"`, `"best"`, `False`, or a path/URL of a
            checkpoint (`.../ckpt-120`) or of a directory to branch from.
            A near miss of a word (`"lastest"`) that is no existing path is
            refused with a suggestion. Defaults to True.
        async_save: bool. Write checkpoints on a background thread; training
            only waits for a snapshot of the state. Defaults to True.
        when_busy: `"wait"` or `"skip"`: what a save does while the previous
            one is still being written. `"wait"` (the default) never drops a
            checkpoint; `"skip"` never blocks training.
        flush_timeout: float or None. Seconds `on_train_end` waits for
            pending writes and uploads. Defaults to None (no limit).
        on_preemption: `"exit"`, `"stop"` or None. On SIGTERM (or a cloud
            preemption notice), save at the next batch boundary, flush within
            `preemption_grace_seconds`, then exit with status 143 (`"exit"`)
            or end `fit()` (`"stop"`). None leaves signals alone.
            Defaults to `"exit"`.
        preemption_grace_seconds: float. Budget from the signal to exit.
            Defaults to 25.
        preemption_watch: None, `"auto"` or a tuple of `"gce"`, `"ec2"`,
            `"azure"`: also poll those metadata servers for preemption
            notices. Defaults to None.
        preemption_poll_interval: float, seconds between two polls of the
            metadata servers in `preemption_watch`. Defaults to 5.
        on_mirror_error: `"continue"` or `"raise"`: what a save does when the
            mirror still fails after its retries (an outage, lost network).
            `"continue"` (the default) keeps training with checkpoints in
            `directory` only and retries the mirror at every save; once it
            answers, the next save uploads every kept checkpoint it lacks.
            `"raise"` stops training with the `StorageError`. The default
            favours the run: a wrong bucket or credentials already fail
            before the first batch (the mirror is checked when `fit()`
            starts), so a later failure is an outage, and stopping would
            throw away the training done while it lasts; but a machine lost
            during the outage resumes from the mirror's last checkpoint, so
            choose `"raise"` where the local disk does not survive the job.
            Either way one log line says what is retried and for how long,
            and another when the mirror answers again.
        save_on_interrupt: bool. On Ctrl-C (SIGINT, a notebook's
            "interrupt kernel"), commit a checkpoint of the current batch at
            the next batch boundary, then raise `KeyboardInterrupt`. A second
            Ctrl-C interrupts at once. Defaults to True.
        verbose: `"auto"`, 0 or 1 (2, True and False are accepted as in
            Keras). Log each save (on its own line between Keras' progress
            bars, at the next epoch start) and what a resume restored.
            `"auto"` is 1, or 0 when `fit(verbose=0)`. Defaults to `"auto"`.

    Attributes:
        stats: list of `keras_ckpt.save_stats.SaveStats`, one per committed
            checkpoint of the current `fit()`: blocking time in the training
            loop, write time, bytes, upload time and mirror lag. With a
            `keras.callbacks.TensorBoard` callback in the same `fit()`, they
            are also written as `keras_ckpt/*` scalars to its `train` run,
            over the global step.

    Example:

    ```python
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss")
    ckpt = keras_ckpt.Checkpoint(
        directory="checkpoints", save_freq=500, max_to_keep=3,
        monitor="val_loss", keep_best=1, state={"plateau": reduce_lr})
    model.fit(ds, epochs=20, validation_data=val_ds,
              callbacks=[ckpt, reduce_lr])
    ```
    """

    def __init__(
        self,
        directory=None,
        mirror=None,
        save_freq="epoch",
        save_every_seconds=None,
        max_to_keep=3,
        keep_every_n_hours=None,
        monitor=None,
        mode="auto",
        keep_best=1,
        state=None,
        resume=True,
        async_save=True,
        when_busy="wait",
        flush_timeout=None,
        on_preemption="exit",
        preemption_grace_seconds=25.0,
        preemption_watch=None,
        preemption_poll_interval=5.0,
        on_mirror_error="continue",
        save_on_epoch_end=None,
        save_on_interrupt=True,
        verbose="auto",
    ):
        super().__init__()
        _check_save_freq(save_freq)
        _check_optional_positive("save_every_seconds", save_every_seconds)
        _check_optional_positive("keep_every_n_hours", keep_every_n_hours)
        _check_optional_positive("flush_timeout", flush_timeout)
        if preemption_grace_seconds is None:
            _invalid("preemption_grace_seconds", None, "a positive number")
        _check_optional_positive(
            "preemption_grace_seconds", preemption_grace_seconds
        )
        if max_to_keep is not None and (
            not _is_int(max_to_keep) or max_to_keep < 1
        ):
            _invalid("max_to_keep", max_to_keep, "a positive int or None")
        if not _is_int(keep_best) or keep_best < 0:
            _invalid("keep_best", keep_best, "a non-negative int")
        _args.check_choice("mode", mode, ("auto", "min", "max"))
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            _invalid("monitor", monitor, "a metric name such as 'val_loss'")
        _check_resume(resume)
        if resume == "best" and monitor is None:
            raise ValueError(
                'Invalid value for argument `resume`. resume="best" needs '
                "`monitor` (e.g. monitor='val_loss')."
            )
        _args.check_choice("when_busy", when_busy, writer_lib.WHEN_BUSY)
        _args.check_choice("on_preemption", on_preemption, _PREEMPTION)
        if save_on_epoch_end is not None and not isinstance(
                save_on_epoch_end, bool):
            _invalid("save_on_epoch_end", save_on_epoch_end,
                     "True, False or None")
        if not isinstance(save_on_interrupt, bool):
            _invalid("save_on_interrupt", save_on_interrupt, "True or False")
        _check_optional_positive(
            "preemption_poll_interval", preemption_poll_interval)
        if preemption_watch is not None:
            from keras_ckpt.preemption import validate_watch

            validate_watch(preemption_watch, "preemption_watch")
        if on_mirror_error not in commit_lib.ON_MIRROR_ERROR:
            _invalid("on_mirror_error", on_mirror_error,
                     '"continue" or "raise"')
        if verbose != "auto" and verbose not in (0, 1, 2, True, False):
            _invalid("verbose", verbose, '"auto", 0 or 1')
        if not isinstance(async_save, bool):
            _invalid("async_save", async_save, "True or False")

        paths = sources.resolve_paths(directory, mirror)
        self.platform = paths.platform
        self.directory = paths.directory
        self.uploader = paths.uploader
        sources.check_local_directory(self.directory, argument="directory")

        self.save_freq = save_freq
        self.save_every_seconds = save_every_seconds
        if save_on_epoch_end is None:
            save_on_epoch_end = monitor is not None
        self.save_on_epoch_end = save_on_epoch_end
        self.save_on_interrupt = save_on_interrupt
        self.monitor = monitor
        self.mode = manager_lib.resolve_mode(monitor, mode)
        self.retention = manager_lib.RetentionPolicy(
            max_to_keep=max_to_keep,
            keep_every_n_hours=keep_every_n_hours,
            monitor=monitor,
            mode=self.mode,
            keep_best=keep_best if monitor is not None else 0,
        )
        self.resume = resume
        self.async_save = async_save
        self.when_busy = when_busy
        self.flush_timeout = flush_timeout
        self.on_preemption = on_preemption
        self.preemption_grace_seconds = float(preemption_grace_seconds)
        self.preemption_watch = preemption_watch
        self.preemption_poll_interval = preemption_poll_interval
        self._verbose_arg = verbose
        self.verbose = 1 if verbose == "auto" else int(verbose)
        self.stats = []
        self._tensorboard = None
        self._entries = state_lib.parse_state_argument(state)
        self.on_mirror_error = on_mirror_error
        self._store = manager_lib.LocalCheckpoints(self.directory)
        self._committer = commit_lib.Committer(
            self._store, self.uploader, self.retention, on_mirror_error)
        self._writer = writer_lib.BackgroundWriter()
        self._cluster = distribute.Cluster(self.platform)
        self._patched = {}
        self._fit_iterator = None  # the EpochIterator of the running fit
        self.preempted = False
        self.restored = None  # CheckpointInfo of the checkpoint resumed from
        self.last_saved = None  # Manifest of the newest committed checkpoint
        self._reset_run_state()

    # ------------------------------------------------------------------
    # Run state
    # ------------------------------------------------------------------
    def _reset_run_state(self):
        self._metadata = None  # sources.metadata(model), once per fit
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
        self._interrupt = None  # the SIGINT handler while fit runs
        self._interrupted = False
        self._reports = collections.deque()  # finished saves, to log
        self._data = state_lib.DataPosition()
        # What this fit resumed (empty for a fresh start) and what of it is
        # still to apply: see resume.py.
        self._resume = resume_lib.Resume(log=self._print)

    @property
    def _training_state(self):
        return state_lib.TrainingState(self.model, self._entries)

    # ------------------------------------------------------------------
    # Keras hooks
    # ------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        _ATTACHED[model] = self  # found by ExportSavedModel
        # Callbacks in `state=` reset themselves in their own
        # `on_train_begin`; re-apply the restored state right after it, and
        # mute their batch hooks while the interrupted epoch's already-trained
        # batches are skipped.
        for entry in self._entries:
            if entry.is_callback and entry.name not in self._patched:
                self._patch_callback(entry)
        # TensorBoard and CSVLogger in fit's list continue their records.
        callback_list = compat.calling_callback_list()
        for callback in getattr(callback_list, "callbacks", ()):
            if isinstance(callback, _LOGGERS) and (
                f"logger-{id(callback)}" not in self._patched
            ):
                self._patch_logger(callback)

    def on_train_begin(self, logs=None):
        self._begin_fit()

    def _begin_fit(self):
        """Starts the run once per fit: from this callback's `on_train_begin`
        or from an earlier one of a logger that must know about the resume
        before it opens its files."""
        epoch_iterator = compat.running_epoch_iterator()
        if epoch_iterator is not None and epoch_iterator is self._fit_iterator:
            return
        self._fit_iterator = epoch_iterator
        self._reset_run_state()
        self.preempted = False
        self.stats = []
        if self._verbose_arg == "auto":
            self.verbose = 0 if (self.params or {}).get("verbose") == 0 else 1
        siblings = compat.sibling_callbacks(self)
        self._check_stateful_siblings(siblings)
        self._tensorboard = next(
            (TensorBoardScalars(c) for c in siblings
             if _is_a(c, ("TensorBoard",)) and hasattr(c, "log_dir")), None)
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
        self._restore_at_start()
        if epoch_iterator is not None:
            compat.wrap_epoch_batches(epoch_iterator, self._epoch_batches)
        self._install_preemption()
        self._install_interrupt()

    def on_epoch_begin(self, epoch, logs=None):
        # Keras' progress bar of the last epoch is finished and the next one
        # not started: the one place a line does not break it.
        self._report_saves()
        self._epoch = epoch
        self._batch = 0 if self._resume.skip_until is None else self._batch
        self._data.on_epoch_begin()
        # Callbacks that are not in fit's list never ran on_train_begin.
        self._resume.finish_pending(self.model, self._training_state,
                                    self._history_epochs, self._history)
        self._resume.on_epoch_begin()
        self._quiet_point()

    def on_train_batch_begin(self, batch, logs=None):
        if self._resume.hides(batch):
            return
        self._quiet_point()

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        if done <= self._batch:
            return  # a batch skipped on resume: trained before the restart
        self._step += done - self._batch
        self._since_save += done - self._batch
        self._batch = done
        self._resume.trained()
        if isinstance(self.save_freq, int) and self._since_save >= self.save_freq:
            self._pending = dict(logs or {})
        elif self._time_to_save():
            self._pending = dict(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        # Keep a reference, not a copy: callbacks after this one add to the
        # same dict (ReduceLROnPlateau adds `learning_rate`). Both the history
        # and a save are taken at the next quiet point, once every callback
        # has seen this epoch's end (and may have changed the LR).
        logs = logs if logs is not None else {}
        self._resume.trained()
        self._epoch = epoch + 1
        self._batch = 0
        if self.preempted:
            return
        self._ended_epoch = (epoch, logs)
        if self.save_freq == "epoch" or self.save_on_epoch_end or (
            self._pending is not None
        ) or self._time_to_save():
            self._pending = logs

    def _record_epoch(self):
        if self._ended_epoch is None:
            return
        epoch, logs = self._ended_epoch
        self._ended_epoch = None
        self._history_epochs.append(epoch)
        for key, value in logs.items():
            self._history.setdefault(key, []).append(_to_float(value))

    def on_train_end(self, logs=None):
        try:
            self.finalize(logs)
        finally:
            self._end_fit()
        if self._interrupted:
            # Ctrl-C after the last batch (e.g. during validation): the final
            # checkpoint is committed; the interrupt still stops the program.
            raise KeyboardInterrupt

    def _end_fit(self):
        """Undoes what `on_train_begin` installed; also after Ctrl-C."""
        try:
            self._report_saves()
        finally:
            self._uninstall_interrupt()
            if self._tensorboard is not None:
                self._tensorboard.close()
            self._uninstall_preemption()
            self._unpatch_callbacks()
            self._resume.undo(self.model)
            if self._fit_iterator is not None:
                compat.unwrap_epoch_batches(self._fit_iterator)
                self._fit_iterator = None
            self._data = state_lib.DataPosition()  # drops the iterators
            self._cluster.end(
                getattr(self.last_saved, "name", None), self.flush_timeout)

    def finalize(self, logs=None):
        """Commits the final checkpoint and waits for pending writes.

        Called by `on_train_end`, and earlier by `ExportSavedModel` when it
        comes first in the callback list. Does nothing the second time.
        """
        if self._finalized:
            return
        self._finalized = True
        self._resume.finish_pending(self.model, self._training_state,
                                    self._history_epochs, self._history)
        self._record_epoch()
        if not self.preempted:
            final_logs = self._pending if self._pending is not None else (
                dict(logs or {})
            )
            if self._step != self._saved_step:
                self._save(final_logs, when_busy="wait")
        self._check_monitor_logged()
        self._flush(self.flush_timeout)
        self._warn_unmirrored()
        self._report_saves()

    def _warn_unmirrored(self):
        """Names the committed checkpoints the mirror lacks (saved while it
        failed, or whose upload a preemption checkpoint superseded)."""
        missing = self._committer.describe_unmirrored()
        if missing:
            logger.warning("keras_ckpt: %s, or let the next run with this "
                           "mirror upload them.", missing)

    # ------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------
    def _time_to_save(self):
        return (
            self.save_every_seconds is not None
            and time.monotonic() - self._last_save_time
            >= self.save_every_seconds
        )

    def _quiet_point(self):
        """A point where no callback is mid-update: save, check, preempt."""
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
            self._flush_loggers()
            self._save(self._pending)

    def _save(self, logs, synchronous=False, when_busy=None):
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
        snapshot = self._training_state.snapshot(
            extra=None if data is None else {state_lib.DATA_POSITION: data})
        position = dict(step=self._step, epoch=self._epoch, batch=self._batch)
        history = {"epochs": list(self._history_epochs),
                   "logs": {k: list(v) for k, v in self._history.items()}}
        if self._metadata is None:  # the model's config: once per fit
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
        in `stats` and writes it to TensorBoard (on the training thread)."""
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
                f"({self._describe_position(manifest.epoch, manifest.batch)}, "
                f"{human_size(manifest.total_bytes)}) to {self.directory}"
                f"{where} in {report['write'] + report.get('upload', 0):.2f} s"
            )
        self.stats.extend(records)
        if self._tensorboard is not None:
            self._tensorboard.write(records)

    def _describe_position(self, epoch, batch):
        """Keras' 1-based epoch numbers: "end of epoch 8/8", "epoch 3/8,
        batch 20"."""
        epochs = (self.params or {}).get("epochs")
        total = f"/{epochs}" if epochs else ""
        if batch == 0 and epoch > 0:
            return f"end of epoch {epoch}{total}"
        return f"epoch {epoch + 1}{total}, batch {batch}"

    def _log(self, message, mid_epoch=False):
        """Prints `message` on a line of its own; `mid_epoch` ends Keras'
        progress bar line first, when there is one (fit(verbose=1))."""
        if self.verbose:
            bar = mid_epoch and (self.params or {}).get("verbose") == 1
            compat.print_msg(("\n" if bar else "") + message)

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

    def _check_stateful_siblings(self, siblings):
        saved = {id(entry.obj) for entry in self._entries}
        missing = [c for c in siblings if _is_a(c, _STATEFUL_CALLBACKS)
                   and id(c) not in saved]
        if missing:
            names = ", ".join(type(c).__name__ for c in missing)
            example = ", ".join(
                f'"{type(c).__name__.lower()}": ...' for c in missing)
            warnings.warn(
                f"keras_ckpt.Checkpoint: {names} in fit()'s callbacks is not "
                "in `state=`, so a resumed run restarts it from scratch "
                "(patience, cooldown, best value). Pass it in `state=` "
                f"(state={{{example}}}) to resume it exactly.",
                stacklevel=2,
            )

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
                self._save(self._pending or {}, synchronous=True)
            self._writer.wait_until_finished(self.flush_timeout)
            if self.last_saved is not None:
                self._log(  # the bar was ended by the SIGINT message
                    f"keras_ckpt: committed {self.last_saved.name} "
                    f"({self._describe_position(self._epoch, self._batch)}) "
                    "before the interrupt; fit() resumes from it.")
        finally:
            self._end_fit()
        raise KeyboardInterrupt

    # ------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------
    def _restore_at_start(self):
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
        resume.restore(self.model, self._training_state, self._data,
                       self._fit_iterator)
        self._epoch, self._batch, self._step = (
            manifest.epoch, manifest.batch, manifest.step)
        self._saved_step = manifest.step
        history = manifest.history or {}
        self._history_epochs = list(history.get("epochs", []))
        self._history = {k: list(v) for k, v in history.get("logs", {}).items()}
        self.restored = sources.info(manifest, found.store, found.origin)
        self._print(
            f"keras_ckpt: resumed from {found.origin}: step {manifest.step}, "
            + self._describe_position(manifest.epoch, manifest.batch)
            + (f" (skipping the {manifest.batch} batches of epoch "
               f"{manifest.epoch + 1} already trained)"
               if manifest.batch else ""))

    def _epoch_batches(self, enumerate_epoch):
        return self._resume.epoch_batches(
            self.model, self._training_state, self._data, self._fit_iterator,
            enumerate_epoch)

    def _print(self, message):
        if self.verbose:
            compat.print_msg(message)

    # ------------------------------------------------------------------
    # Patching of the callbacks passed in `state=`
    # ------------------------------------------------------------------
    def _patch_callback(self, entry):
        obj = entry.obj
        originals = {
            name: obj.__dict__.get(name)
            for name in ("on_train_begin", "on_train_batch_begin",
                         "on_train_batch_end")
        }
        bound_begin = obj.on_train_begin
        bound_batch_begin = obj.on_train_batch_begin
        bound_batch_end = obj.on_train_batch_end

        def on_train_begin(logs=None):
            bound_begin(logs)
            self._resume.began.add(entry.name)
            self._resume.apply_values(self._training_state, {entry.name})

        def on_train_batch_begin(batch, logs=None):
            if not self._resume.hides(batch):
                bound_batch_begin(batch, logs)

        def on_train_batch_end(batch, logs=None):
            if not self._resume.hides(batch):
                bound_batch_end(batch, logs)

        obj.on_train_begin = on_train_begin
        obj.on_train_batch_begin = on_train_batch_begin
        obj.on_train_batch_end = on_train_batch_end
        self._patched[entry.name] = (obj, originals)

    def _patch_logger(self, callback):
        """TensorBoard and CSVLogger continue their records on resume.

        TensorBoard numbers batch scalars with a counter its `on_train_begin`
        resets to 0: it is set to the resumed global step. CSVLogger opens
        its file with mode "w" unless `append=True`: on resume it appends,
        after dropping the rows of the resumed epoch and later ones that the
        interrupted run wrote after its last checkpoint.
        """
        bound = callback.on_train_begin
        originals = {"on_train_begin": callback.__dict__.get("on_train_begin")}

        def on_train_begin(logs=None):
            self._begin_fit()
            resumed = self._resume.manifest
            if resumed is None:
                return bound(logs)
            if isinstance(callback, keras.callbacks.CSVLogger):
                _drop_rows_from(callback.filename, callback.sep, resumed.epoch)
                append, callback.append = callback.append, True
                try:
                    return bound(logs)
                finally:
                    callback.append = append
            bound(logs)
            compat.set_tensorboard_step(callback, resumed.step)

        callback.on_train_begin = on_train_begin
        self._patched[f"logger-{id(callback)}"] = (callback, originals)

    def _flush_loggers(self):
        """Makes TensorBoard's records up to a checkpoint durable with it:
        a SIGKILL would drop its buffered events, which a resume does not
        write again."""
        for callback, _ in self._patched.values():
            if isinstance(callback, keras.callbacks.TensorBoard):
                compat.flush_tensorboard(callback)

    def _unpatch_callbacks(self):
        for obj, originals in self._patched.values():
            for name, original in originals.items():
                if original is None:
                    obj.__dict__.pop(name, None)
                else:
                    setattr(obj, name, original)
        self._patched = {}

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
            f"{self._describe_position(self._epoch, self._batch)} with "
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
                self._save(self._pending or {}, synchronous=True)
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
        # "stop": end fit without training the batch that is about to run,
        # so the model in memory is exactly the checkpoint just committed.
        self.model.stop_training = True
        model = self.model

        def skip_once(iterator):
            compat.replace_train_function(model, original)
            return model.get_metrics_result()

        original = compat.replace_train_function(model, skip_once)

    def _log_platform(self):
        if self.verbose and self.platform is not None and (
            self.platform.name != "local"
        ):
            compat.print_msg(f"keras_ckpt: {self.platform.describe()}")

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


_LOGGERS = (keras.callbacks.TensorBoard, keras.callbacks.CSVLogger)
# The end-of-fit flush says what it waits for after this many seconds, then
# again every FLUSH_PROGRESS_EVERY s (in place on a terminal).
FLUSH_QUIET_SECONDS = 2.0
FLUSH_PROGRESS_EVERY = 10.0
_FLUSH_POLL_SECONDS = 0.25


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _drop_rows_from(filename, sep, epoch):
    """Keeps a CSVLogger file's header and its rows of epochs < `epoch`,
    byte for byte (the epoch is the first field, never quoted)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(filename):
        return
    with tf.io.gfile.GFile(filename, "r") as f:
        lines = f.read().splitlines(keepends=True)
    kept = lines[:1] + [
        line for line in lines[1:] if _epoch_of(line, sep) < epoch]
    with tf.io.gfile.GFile(filename, "w") as f:
        f.write("".join(kept))


def _epoch_of(line, sep):
    try:
        return int(line.split(sep, 1)[0])
    except ValueError:
        return _UNREADABLE_ROW


_UNREADABLE_ROW = 1 << 62  # an unreadable row is dropped with the later ones


_is_int = _args.is_int


_invalid = _args.invalid


def _is_a(callback, class_names):
    """By class name, so that Keras 3 and tf_keras callbacks (and their
    subclasses) both match without importing tf_keras."""
    return any(cls.__name__ in class_names for cls in type(callback).__mro__)


def _check_resume(resume):
    expected = 'True, "latest", "best", False, or a checkpoint path/URL'
    if isinstance(resume, bool) or resume in ("latest", "best"):
        return
    if not isinstance(resume, (str, os.PathLike)):
        _invalid("resume", resume, expected)
    text = os.fspath(resume)
    if "://" in text or os.path.exists(text):
        return
    hint = _args.suggestion(text, ("latest", "best"))
    if hint:  # "lastest" is a typo, not a directory to branch from
        _invalid("resume", resume, expected, hint)


def _check_save_freq(save_freq):
    if save_freq == "epoch":
        return
    if not _is_int(save_freq) or save_freq < 1:
        _invalid("save_freq", save_freq, '"epoch" or a positive int')


def _check_optional_positive(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value <= 0
    ):
        _invalid(name, value, "a positive number or None")


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
