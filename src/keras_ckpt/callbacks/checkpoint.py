"""`keras_ckpt.Checkpoint`: save everything, resume exactly."""

import os
import sys
import time
import warnings

import keras
from keras.src.utils import io_utils

from keras_ckpt import _keras_compat as compat
from keras_ckpt import distribute
from keras_ckpt import manager as manager_lib
from keras_ckpt import sources
from keras_ckpt import state as state_lib
from keras_ckpt import writer as writer_lib
from keras_ckpt.errors import IncompatibleCheckpointError

_RESUME_WORDS = (True, False, "latest", "best")
_PREEMPTION = ("exit", "stop", None)
PREEMPTED_EXIT_CODE = 143


class Checkpoint(distribute.Callback):
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
        max_to_keep: int or None. Keep the newest N checkpoints (None keeps
            all). Defaults to 3.
        keep_every_n_hours: float or None. Also keep one checkpoint in every
            N-hour window. Defaults to None.
        monitor: str or None. Logged metric (e.g. `"val_loss"`) that ranks
            checkpoints for `keep_best` and `resume="best"`. Defaults to None.
        mode: `"auto"`, `"min"` or `"max"`: whether a lower or a higher
            `monitor` is better. Defaults to `"auto"`.
        keep_best: int. Also keep the best K checkpoints by `monitor`; the
            best value survives restarts. Defaults to 1.
        state: dict or None, `{"name": obj}` of extra state to save: Keras
            callbacks (`EarlyStopping`, `ReduceLROnPlateau`,
            `ModelCheckpoint`, `LearningRateScheduler`), objects with
            `get_state()` / `set_state(dict)`, or TF/Keras variables,
            `tf.random.Generator`s and modules. Defaults to None.
        resume: `True`/`"latest"`, `"best"`, `False`, or a path/URL of a
            checkpoint (`.../ckpt-120`) or of a directory to branch from.
            Defaults to True.
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
        verbose: 0 or 1 (2, True and False are accepted as in Keras). Log
            each save and what a resume restored. Defaults to 1.

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
        verbose=1,
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
        if mode not in ("auto", "min", "max"):
            _invalid("mode", mode, '"auto", "min" or "max"')
        if monitor is not None and not isinstance(monitor, str):
            _invalid("monitor", monitor, "a metric name such as 'val_loss'")
        if not (
            isinstance(resume, (str, os.PathLike))
            or any(resume is w or resume == w for w in _RESUME_WORDS
                   if not isinstance(w, bool) or isinstance(resume, bool))
        ):
            _invalid("resume", resume,
                     'True, "latest", "best", False, or a checkpoint path/URL')
        if resume == "best" and monitor is None:
            raise ValueError(
                'Invalid value for argument `resume`. resume="best" needs '
                "`monitor` (e.g. monitor='val_loss')."
            )
        if when_busy not in writer_lib.WHEN_BUSY:
            _invalid("when_busy", when_busy, '"wait" or "skip"')
        if on_preemption not in _PREEMPTION:
            _invalid("on_preemption", on_preemption, '"exit", "stop" or None')
        _check_optional_positive(
            "preemption_poll_interval", preemption_poll_interval)
        if preemption_watch is not None:
            from keras_ckpt.preemption import validate_watch

            validate_watch(preemption_watch, "preemption_watch")
        if verbose not in (0, 1, 2, True, False):
            _invalid("verbose", verbose, "0 or 1")
        if not isinstance(async_save, bool):
            _invalid("async_save", async_save, "True or False")

        paths = sources.resolve_paths(directory, mirror)
        self.platform = paths.platform
        self.directory = paths.directory
        self.uploader = paths.uploader
        sources.check_local_directory(self.directory, argument="directory")

        self.save_freq = save_freq
        self.save_every_seconds = save_every_seconds
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
        self.verbose = int(verbose)
        self._entries = state_lib.parse_state_argument(state)
        self._store = manager_lib.LocalCheckpoints(self.directory)
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
        self._epoch = 0
        self._batch = 0  # batches of self._epoch already trained
        self._step = 0  # global batch count
        self._since_save = 0
        self._last_save_time = time.monotonic()
        self._pending = None  # logs of a requested save, taken at a quiet point
        self._saved_step = None
        self._history = {}
        self._history_epochs = []
        self._skip_until = None
        self._pending_metrics = None
        self._pending_values = None
        self._pending_history = None
        self._began = set()
        self._preemption = None
        self._ended_epoch = None
        self._finalized = False
        self._data = state_lib.DataPosition()
        self._resumed = None  # Manifest resumed from in this fit
        self._skip_batches = 0  # steps of the resumed epoch trained before

    @property
    def _training_state(self):
        return state_lib.TrainingState(self.model, self._entries)

    # ------------------------------------------------------------------
    # Keras hooks
    # ------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        model._keras_ckpt_checkpoint = self  # found by ExportSavedModel
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
        self._cluster.begin(
            self.model, log=io_utils.print_msg if self.verbose else None)
        self._writer.check_for_errors()
        if self.uploader is not None:
            self.uploader.check()
        if self._cluster.writes:
            self._store.ensure_directory()
        self._log_platform()
        if epoch_iterator is not None:
            self._check_input(self._data.attach(epoch_iterator))
        self._restore_at_start()
        if epoch_iterator is not None:
            compat.wrap_epoch_batches(epoch_iterator, self._epoch_batches)
        self._install_preemption()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batch = 0 if self._skip_until is None else self._batch
        self._data.on_epoch_begin()
        if self._pending_values is not None:
            # Callbacks that are not in fit's list never ran on_train_begin.
            self._apply_callback_values(None)
        if self._pending_history is not None:
            self._prefill_history()
        if self._pending_metrics is not None and self._skip_until is None:
            self._pending_metrics = None
        self._quiet_point()

    def on_train_batch_begin(self, batch, logs=None):
        if self._skip_until is not None and batch < self._skip_until:
            return
        self._quiet_point()

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        if done <= self._batch:
            return  # a batch skipped on resume: trained before the restart
        self._step += done - self._batch
        self._since_save += done - self._batch
        self._batch = done
        if self._skip_until is not None:
            self._skip_until = None
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
        self._skip_until = None
        self._epoch = epoch + 1
        self._batch = 0
        if self.preempted:
            return
        self._ended_epoch = (epoch, logs)
        if self.save_freq == "epoch" or self._pending is not None or (
            self._time_to_save()
        ):
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
            self._uninstall_preemption()
            self._unpatch_callbacks()
            distribute.clear_initial_epoch(self.model)
            self._restore_train_function()
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
        if self._pending_history is not None:
            self._prefill_history()
        if self._pending_values is not None:
            self._apply_callback_values(None)
        self._record_epoch()
        if not self.preempted:
            final_logs = self._pending if self._pending is not None else (
                dict(logs or {})
            )
            if self._step != self._saved_step:
                self._save(final_logs, when_busy="wait")
        self._writer.wait_until_finished(self.flush_timeout)

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
        self._record_epoch()
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
        data = self._data.get_state(self._batch)
        snapshot = self._training_state.snapshot(
            extra=None if data is None else {state_lib.DATA_POSITION: data})
        position = dict(step=self._step, epoch=self._epoch, batch=self._batch)
        history = {"epochs": list(self._history_epochs),
                   "logs": {k: list(v) for k, v in self._history.items()}}
        metadata = sources.metadata(self.model)
        self._saved_step = self._step

        def job():
            start = time.perf_counter()
            manifest = self._store.write(
                snapshot, metrics=logs, history=history, metadata=metadata,
                **position,
            )
            kept = self._store.retain(self.retention)
            self.last_saved = manifest
            if self.uploader is not None:
                self.uploader.mirror(
                    self.directory, manifest.name, [m.name for m in kept]
                )
            if self.verbose:
                where = f" and {self.uploader.url}" if self.uploader else ""
                io_utils.print_msg(
                    f"\nkeras_ckpt: saved {manifest.name} (epoch "
                    f"{manifest.epoch}, batch {manifest.batch}, "
                    f"{_format_bytes(manifest.total_bytes)}) to "
                    f"{self.directory}{where} in "
                    f"{time.perf_counter() - start:.2f} s"
                )

        if self.async_save and not synchronous:
            if not self._writer.submit(job, when_busy=when_busy or self.when_busy):
                self._saved_step = None
                if self.verbose:
                    io_utils.print_msg(
                        f"\nkeras_ckpt: skipped the save at step {self._step}: "
                        "the previous checkpoint is still being written."
                    )
        else:
            self._writer.wait_until_finished(self.flush_timeout)
            job()

    # ------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------
    def _restore_at_start(self):
        found = self._cluster.find_resume_checkpoint(
            self.resume, self._store, self.uploader, self.retention
        )
        if found is None:
            if self.verbose:
                io_utils.print_msg(
                    f"keras_ckpt: no checkpoint to resume from in "
                    f"{self.directory}; starting from scratch."
                )
            return
        manifest, store, origin = found
        self._check_no_newer(manifest)
        self._build_for_restore(manifest, store.prefix(manifest.name))
        training_state = self._training_state
        training_state.check_compatible(
            manifest.variables, store.prefix(manifest.name)
        )
        arrays = store.read_arrays(manifest)
        groups = [g for g in manifest.variables if not g.startswith("metrics")]
        training_state.assign(arrays, groups)

        self._epoch, self._batch, self._step = (
            manifest.epoch, manifest.batch, manifest.step,
        )
        self._saved_step = manifest.step
        distribute.set_initial_epoch(self.model, manifest.epoch)
        self._pending_values = (manifest.state, arrays)
        # Plain objects now; callbacks once their own on_train_begin has run.
        self._apply_callback_values(self._began | {
            e.name for e in self._entries if not e.is_callback})
        history = manifest.history or {}
        self._history_epochs = list(history.get("epochs", []))
        self._history = {k: list(v) for k, v in history.get("logs", {}).items()}
        self._pending_history = True
        self._resumed = manifest
        self._data.set_resume(
            manifest.state.get(state_lib.DATA_POSITION),
            arrays.get(f"adapter/{state_lib.DATA_POSITION}", []))
        self._check_resumed_input(manifest)
        if manifest.batch > 0:
            self._pending_metrics = (manifest.variables, arrays)
            self._skip_until = manifest.batch
            if self._fit_iterator is not None:
                self._skip_batches = manifest.batch
            else:
                self._install_skip(manifest.batch)
        self.restored = sources.info(manifest, store, origin)
        if self.verbose:
            io_utils.print_msg(
                f"keras_ckpt: resumed from {origin}: step {manifest.step}, "
                f"epoch {manifest.epoch}, batch {manifest.batch}"
                + (f" (skipping the {manifest.batch} batches of epoch "
                   f"{manifest.epoch} already trained)" if manifest.batch else "")
            )

    def _check_no_newer(self, manifest):
        """Branching must not mix with a newer run already in `directory`."""
        newer = [m for m in self._store.manifests() if m.step > manifest.step]
        if newer and self.resume not in (True, "latest", "best"):
            raise IncompatibleCheckpointError(
                f"{self.directory} already holds checkpoints newer than the "
                f"one you resume from ({newer[-1].name} > {manifest.name}). "
                "Use another `directory` for the branched run."
            )

    def _build_for_restore(self, manifest, source):
        """Creates the variables a restore assigns, whatever `built` says."""
        model = self.model
        if not model.built and not model.variables:
            raise ValueError(
                "keras_ckpt.Checkpoint needs a model whose variables exist to "
                f"resume from {source}. Build it before fit(), e.g. with "
                "keras.Input(...) or by calling it on a batch of data."
            )
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and "optimizer" in manifest.variables and (
            not distribute.optimizer_built(optimizer)
        ):
            # Otherwise the optimizer's slots would be created (and zeroed)
            # after the restore.
            optimizer.build(model.trainable_variables)
        for attr, other in state_lib.attribute_optimizers(model):
            if f"optimizer/{attr}" in manifest.variables and (
                not distribute.optimizer_built(other)
            ):
                raise ValueError(
                    f"keras_ckpt.Checkpoint cannot resume from {source}: "
                    f"`model.{attr}` is not built, so its slots would be "
                    "created (zeroed) after the restore. Build it before "
                    f"fit(), e.g. `model.{attr}.build(<the sub-model it "
                    "updates>.trainable_variables)`."
                )

    def _epoch_batches(self, enumerate_epoch):
        """The steps of each epoch that `fit` trains (see `DataPosition`)."""
        skip, self._skip_batches = self._skip_batches, 0
        return self._data.batches(enumerate_epoch, skip, self._on_seek)

    def _on_seek(self, last_batch):
        if self._pending_metrics is not None:
            self._restore_metrics(last_batch)

    def _install_skip(self, n_batches):
        """Consumes the already-trained batches of the interrupted epoch.

        For tf_keras' `fit`, which has no `EpochIterator` to seek: for the
        first calls of the resumed epoch `train_function` is replaced by one
        that only pulls the batches from the iterator, without training.
        """
        model = self.model
        steps_per_execution = distribute.steps_per_execution(model)
        remaining = [n_batches]

        def skip_or_train(iterator):
            if remaining[0] <= 0:
                compat.replace_train_function(model, original)
                return original(iterator)
            count = min(steps_per_execution, remaining[0])
            for _ in range(count):
                batch = next(iterator)
                if self._pending_metrics is not None:
                    self._restore_metrics(batch)
            remaining[0] -= count
            return model.get_metrics_result()

        original = compat.replace_train_function(model, skip_or_train)
        self._original_train_function = original

    def _restore_train_function(self):
        original = getattr(self, "_original_train_function", None)
        if original is not None:
            compat.replace_train_function(self.model, original)
            self._original_train_function = None

    def _restore_metrics(self, data_batch):
        specs, arrays = self._pending_metrics
        self._pending_metrics = None
        model = self.model
        if data_batch is None and self._fit_iterator is not None:
            dataset = compat.user_dataset(self._fit_iterator)
            if dataset is not None:
                data_batch = compat.zeros_like_spec(dataset.element_spec)
        try:
            if data_batch is not None:
                compat.build_compiled_metrics(model, data_batch)
        except Exception:  # metrics stay as they are; weights are exact
            pass
        if not self._training_state.assign_metrics(specs, arrays):
            if self.verbose:
                io_utils.print_msg(
                    "keras_ckpt: this epoch's running metrics could not be "
                    "restored (the compiled metrics changed); they restart "
                    "from the resumed batch."
                )

    # ------------------------------------------------------------------
    # Where exactness depends on the input or the hardware: say so once.
    # ------------------------------------------------------------------
    def _check_input(self, shuffles):
        if any(not seeded for seeded, _ in shuffles):
            _warn_inexact(
                "the tf.data pipeline given to fit() has a `shuffle` without "
                "a seed, so its order differs in every process and a resumed "
                "run trains on other batches than an uninterrupted one. Fix: "
                "pass `seed=` to `Dataset.shuffle` (or call "
                "`keras.utils.set_random_seed(...)` before building the "
                "dataset)."
            )

    def _check_resumed_input(self, manifest):
        saved = manifest.state.get(state_lib.DATA_POSITION) or {}
        if self._data.kind == "generator" and saved.get("total"):
            _warn_inexact(
                f"the input is a Python generator: to resume at step "
                f"{manifest.step} its first {saved['total']} batches are "
                "drawn again and dropped, which is exact only if it yields "
                "the same batches in the same order in every run (and costs "
                "reading them). Fix: use a `keras.utils.PyDataset` or a "
                "tf.data pipeline with seeded randomness."
            )
        saved_copies = len(manifest.variables.get("metrics/replicas", []))
        live_copies = len(
            self._training_state.specs().get("metrics/replicas", []))
        if manifest.batch > 0 and saved_copies != live_copies:
            _warn_inexact(
                "the checkpoint was written with another number of local "
                "replicas than this run has: the interrupted epoch's running "
                "metrics are restored as their total, so the epoch's logged "
                "metrics may differ in the last digits (weights and optimizer "
                "state are exact). Fix: resume on as many devices, or resume "
                "from a checkpoint taken at an epoch boundary."
            )

    def _apply_callback_values(self, names):
        values, arrays = self._pending_values
        self._training_state.apply_values(values, arrays, names)
        if names is None:
            self._pending_values = None

    def _prefill_history(self):
        self._pending_history = None
        history = getattr(self.model, "history", None)
        if history is None or not hasattr(history, "history"):
            return
        if getattr(history, "epoch", None) == [] and self._history_epochs:
            history.epoch = list(self._history_epochs)
            history.history = {k: list(v) for k, v in self._history.items()}

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
            self._began.add(entry.name)
            if self._pending_values is not None:
                self._apply_callback_values({entry.name})

        def on_train_batch_begin(batch, logs=None):
            if self._skip_until is None or batch >= self._skip_until:
                bound_batch_begin(batch, logs)

        def on_train_batch_end(batch, logs=None):
            if self._skip_until is None or batch >= self._skip_until:
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
            resumed = self._resumed
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
        )
        self._preemption.install()

    def _uninstall_preemption(self):
        if self._preemption is not None:
            self._preemption.uninstall()
            self._preemption = None

    def _handle_preemption(self):
        handler = self._preemption
        start = time.monotonic()
        if self.verbose:
            io_utils.print_msg(
                f"\nkeras_ckpt: preemption notice ({handler.reason}); saving "
                f"at epoch {self._epoch}, batch {self._batch} with "
                f"{handler.remaining():.0f} s left."
            )
        try:
            self._writer.wait_until_finished(max(handler.remaining(), 0.1))
            if self._step != self._saved_step:
                self._save(self._pending or {}, synchronous=True)
        finally:
            self.preempted = True
            self._cluster.preemption_saved(
                handler, getattr(self.last_saved, "name", None))
        if self.verbose:
            io_utils.print_msg(
                f"keras_ckpt: preemption checkpoint committed in "
                f"{time.monotonic() - start:.2f} s."
            )
        if self.on_preemption == "exit":
            self._uninstall_preemption()
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(PREEMPTED_EXIT_CODE)
        # "stop": end fit without training the batch that is about to run,
        # so the model in memory is exactly the checkpoint just committed.
        self.model.stop_training = True
        model = self.model
        original = model.train_function

        def skip_once(iterator):
            model.train_function = original
            return model.get_metrics_result()

        model.train_function = skip_once

    def _log_platform(self):
        if self.verbose and self.platform is not None and (
            self.platform.name != "local"
        ):
            io_utils.print_msg(f"keras_ckpt: {self.platform.describe()}")

    # ------------------------------------------------------------------
    # Flushing
    # ------------------------------------------------------------------
    def wait_until_finished(self, timeout=None):
        """Waits for pending writes and uploads; raises their errors."""
        self._writer.wait_until_finished(timeout)


_LOGGERS = (keras.callbacks.TensorBoard, keras.callbacks.CSVLogger)


def _warn_inexact(cause):
    warnings.warn(
        f"keras_ckpt cannot guarantee an exact resume: {cause}",
        UserWarning, stacklevel=3,
    )


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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(name, value, expected):
    raise ValueError(
        f"Invalid value for argument `{name}`. Received: {name}={value!r}. "
        f"Expected {expected}."
    )


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


def _format_bytes(size):
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
