"""`keras_ckpt.Checkpoint`: the Keras face of the engine.

Every hook of `fit` becomes a call of a `keras_ckpt.CheckpointManager`
(engine/checkpoint_manager.py), which saves, commits, resumes and handles
preemption. What stays here is what only `fit` has: its arguments, its
running `EpochIterator`, the callbacks in its list (those in `state=` and
the loggers, whose hooks are wrapped so that a resume continues them), and
`stop_training`.
"""

import warnings
import weakref

import keras

from keras_ckpt import _args
from keras_ckpt import _keras_compat as compat
from keras_ckpt import manager as manager_lib
from keras_ckpt.engine import checkpoint_manager as engine_lib
from keras_ckpt.engine import policies
from keras_ckpt.save_stats import TensorBoardScalars

# Keras callbacks whose state decides what training does next; left out of
# `state=`, a resumed run would start them afresh.
_STATEFUL_CALLBACKS = ("EarlyStopping", "ReduceLROnPlateau",
                       "LearningRateScheduler", "ModelCheckpoint")
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
        engine_lib.check_optional_positive(
            "save_every_seconds", save_every_seconds)
        engine_lib.check_optional_positive(
            "keep_every_n_hours", keep_every_n_hours)
        if max_to_keep is not None and (
            not _args.is_int(max_to_keep) or max_to_keep < 1
        ):
            _args.invalid("max_to_keep", max_to_keep, "a positive int or None")
        if not _args.is_int(keep_best) or keep_best < 0:
            _args.invalid("keep_best", keep_best, "a non-negative int")
        _args.check_choice("mode", mode, ("auto", "min", "max"))
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            _args.invalid("monitor", monitor,
                          "a metric name such as 'val_loss'")
        if save_on_epoch_end is not None and not isinstance(
                save_on_epoch_end, bool):
            _args.invalid("save_on_epoch_end", save_on_epoch_end,
                          "True, False or None")
        if verbose != "auto" and verbose not in (0, 1, 2, True, False):
            _args.invalid("verbose", verbose, '"auto", 0 or 1')
        if save_on_epoch_end is None:
            save_on_epoch_end = monitor is not None
        self.save_freq = save_freq
        self.save_every_seconds = save_every_seconds
        self.save_on_epoch_end = save_on_epoch_end
        self.monitor = monitor
        self.mode = manager_lib.resolve_mode(monitor, mode)
        self._verbose_arg = verbose
        self.manager = engine_lib.CheckpointManager(
            directory, mirror, state=state,
            save_policy=_save_policy(save_freq, save_every_seconds,
                                     save_on_epoch_end),
            keep=manager_lib.RetentionPolicy(
                max_to_keep=max_to_keep,
                keep_every_n_hours=keep_every_n_hours,
                monitor=monitor,
                mode=self.mode,
                keep_best=keep_best if monitor is not None else 0,
            ),
            resume=resume, async_save=async_save, when_busy=when_busy,
            flush_timeout=flush_timeout, on_preemption=on_preemption,
            preemption_grace_seconds=preemption_grace_seconds,
            preemption_watch=preemption_watch,
            preemption_poll_interval=preemption_poll_interval,
            on_mirror_error=on_mirror_error,
            save_on_interrupt=save_on_interrupt,
            verbose=1 if verbose == "auto" else int(verbose),
        )
        self.manager.before_save = self._flush_loggers
        self.manager.on_abort = self._end_fit
        self.manager.stop_training = self._stop_training
        self._patched = {}
        self._fit_iterator = None  # the EpochIterator of the running fit

    # What the manager holds, under the callback's names of before the
    # engine existed.
    directory = property(lambda self: self.manager.directory)
    uploader = property(lambda self: self.manager.uploader)
    platform = property(lambda self: self.manager.platform)
    retention = property(lambda self: self.manager.retention)
    verbose = property(lambda self: self.manager.verbose)
    stats = property(lambda self: self.manager.stats)
    preempted = property(lambda self: self.manager.preempted)
    restored = property(lambda self: self.manager.restored)
    last_saved = property(lambda self: self.manager.last_saved)
    _store = property(lambda self: self.manager._store)
    _writer = property(lambda self: self.manager._writer)
    _committer = property(lambda self: self.manager._committer)
    _step = property(lambda self: self.manager._step)
    _saved_step = property(lambda self: self.manager._saved_step)

    @property
    def _save(self):
        return self.manager._save_now

    @_save.setter
    def _save(self, save):  # a probe wrapping the engine's save
        self.manager._save_now = save

    # ------------------------------------------------------------------
    # Keras hooks
    # ------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self.manager.model = model
        _ATTACHED[model] = self  # found by ExportSavedModel
        # Callbacks in `state=` reset themselves in their own
        # `on_train_begin`; re-apply the restored state right after it, and
        # mute their batch hooks while the interrupted epoch's already-trained
        # batches are skipped.
        for entry in self.manager.entries:
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
        manager = self.manager
        manager.reset()
        params = self.params or {}
        if self._verbose_arg == "auto":
            manager.verbose = 0 if params.get("verbose") == 0 else 1
        manager.epochs = params.get("epochs")
        manager.progress_bar = params.get("verbose") == 1
        siblings = compat.sibling_callbacks(self)
        self._check_stateful_siblings(siblings)
        manager.stats_writer = next(
            (TensorBoardScalars(c) for c in siblings
             if _is_a(c, ("TensorBoard",)) and hasattr(c, "log_dir")), None)
        manager.start(epoch_iterator)
        if epoch_iterator is not None:
            compat.wrap_epoch_batches(
                epoch_iterator, lambda enumerate_epoch: manager.epoch_batches(
                    epoch_iterator, enumerate_epoch))

    def on_epoch_begin(self, epoch, logs=None):
        # Keras' progress bar of the last epoch is finished and the next one
        # not started: the one place a line does not break it.
        self.manager.epoch_begin(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.manager.batch_begin(batch)

    def on_train_batch_end(self, batch, logs=None):
        self.manager.batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # Keep a reference, not a copy: callbacks after this one add to the
        # same dict (ReduceLROnPlateau adds `learning_rate`). Both the history
        # and a save are taken at the next quiet point, once every callback
        # has seen this epoch's end (and may have changed the LR).
        self.manager.epoch_end(epoch, logs if logs is not None else {})

    def on_train_end(self, logs=None):
        try:
            self.finalize(logs)
        finally:
            self._end_fit()
        if self.manager.interrupted:
            # Ctrl-C after the last batch (e.g. during validation): the final
            # checkpoint is committed; the interrupt still stops the program.
            raise KeyboardInterrupt

    def finalize(self, logs=None):
        """Commits the final checkpoint and waits for pending writes.

        Called by `on_train_end`, and earlier by `ExportSavedModel` when it
        comes first in the callback list. Does nothing the second time.
        """
        self.manager.finalize(logs)

    def wait_until_finished(self, timeout=None):
        """Waits for pending writes and uploads; raises their errors."""
        self.manager.wait_until_finished(timeout)

    def _end_fit(self):
        """Undoes what `on_train_begin` installed; also after Ctrl-C."""
        try:
            self.manager.end()
        finally:
            self._unpatch_callbacks()
            if self._fit_iterator is not None:
                compat.unwrap_epoch_batches(self._fit_iterator)
                self._fit_iterator = None

    def _stop_training(self):
        """on_preemption="stop": ends fit without training the batch that is
        about to run, so the model in memory is exactly the checkpoint just
        committed."""
        model = self.model
        model.stop_training = True

        def skip_once(iterator):
            compat.replace_train_function(model, original)
            return model.get_metrics_result()

        original = compat.replace_train_function(model, skip_once)

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
            resumed = self.manager.resumed
            resumed.began.add(entry.name)
            resumed.apply_values(self.manager.training_state, {entry.name})

        def on_train_batch_begin(batch, logs=None):
            if not self.manager.resumed.hides(batch):
                bound_batch_begin(batch, logs)

        def on_train_batch_end(batch, logs=None):
            if not self.manager.resumed.hides(batch):
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
            resumed = self.manager.resumed.manifest
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

    def _check_stateful_siblings(self, siblings):
        saved = {id(entry.obj) for entry in self.manager.entries}
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


_LOGGERS = (keras.callbacks.TensorBoard, keras.callbacks.CSVLogger)


def _save_policy(save_freq, save_every_seconds, save_on_epoch_end):
    """The engine's save policy of the callback's arguments."""
    chosen = [policies.SaveAtEpochEnd() if save_freq == "epoch"
              else policies.SaveEveryNSteps(save_freq)]
    if save_on_epoch_end and save_freq != "epoch":
        chosen.append(policies.SaveAtEpochEnd())
    if save_every_seconds is not None:
        chosen.append(policies.SaveEveryNSeconds(save_every_seconds))
    return chosen[0] if len(chosen) == 1 else policies.AnyOf(tuple(chosen))


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


def _is_a(callback, class_names):
    """By class name, so that Keras 3 and tf_keras callbacks (and their
    subclasses) both match without importing tf_keras."""
    return any(cls.__name__ in class_names for cls in type(callback).__mro__)


def _check_save_freq(save_freq):
    if save_freq == "epoch":
        return
    if not _args.is_int(save_freq) or save_freq < 1:
        _args.invalid("save_freq", save_freq, '"epoch" or a positive int')
