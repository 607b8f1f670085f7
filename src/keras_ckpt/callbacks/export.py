"""`keras_ckpt.ExportSavedModel`: a servable model at the end of a completed fit."""

import os

from keras_ckpt import _args
from keras_ckpt import _keras_compat as compat
from keras_ckpt import export as export_lib
from keras_ckpt.engine import state as state_lib
from keras_ckpt.manifest import CheckpointInfo

SOURCES = ("latest", "best", "model")
LAYOUTS = ("auto",) + export_lib.LAYOUTS


class ExportSavedModel(compat.Callback):
    """Exports a SavedModel when `fit()` completes — never after preemption.

    The SavedModel has `serve` and `serving_default` signatures and is
    written in the layout the serving platform loads: SageMaker's TensorFlow
    Serving `$SM_MODEL_DIR/<version>/`, Vertex AI's `$AIP_MODEL_DIR/` root
    (uploaded to `gs://`), or `<export_dir>/<version>/`.

    Args:
        export_dir: str or None, local directory or URL. None uses the
            detected platform's model directory (`./export` locally).
        source: `"latest"` (the final checkpoint, i.e. the final weights),
            `"best"` (the best checkpoint by the `Checkpoint` callback's
            `monitor`, among those that logged it; `fit()` refuses to start
            without a monitored `Checkpoint` in the same callbacks), or
            `"model"` (the in-memory model as is). Defaults to `"latest"`.
        layout: `"auto"` (the detected platform's), `"plain"`, `"sagemaker"`
            or `"vertex"`. Defaults to `"auto"`.
        version: int or None, the numeric version directory for `"plain"`
            and `"sagemaker"` layouts; must be None for `"vertex"`.
            Defaults to None, meaning 1.
        overwrite: bool, replace an earlier export at the same place (a
            restarted job exports again). Defaults to True.
        verbose: 0 or 1. Print which checkpoint (name, step, monitored
            value) was exported, and where. Defaults to 1.

    Attributes:
        exported_to: str or None, where the last export was written.
        exported: `CheckpointInfo` or None, the checkpoint it was exported
            from (None for `source="model"` or without a `Checkpoint`).

    Example:

    ```python
    ckpt = keras_ckpt.Checkpoint(monitor="val_loss")
    model.fit(ds, epochs=10, validation_data=val_ds,
              callbacks=[ckpt, keras_ckpt.ExportSavedModel(source="best")])
    ```
    """

    def __init__(self, export_dir=None, source="latest", layout="auto",
                 version=None, overwrite=True, verbose=1):
        super().__init__()
        _args.check_choice("source", source, SOURCES)
        _args.check_choice("layout", layout, LAYOUTS)
        if verbose not in (0, 1, True, False):
            _args.invalid("verbose", verbose, "0 or 1")
        from keras_ckpt.platforms import detect_platform

        self.platform = detect_platform()
        self.layout = self.platform.export_layout if layout == "auto" else layout
        export_lib.validate_version(version, self.layout)
        self.export_dir = export_dir if export_dir is not None else (
            self.platform.model_dir
        )
        self.source = source
        self.version = version
        self.overwrite = overwrite
        self.verbose = verbose
        self.exported_to = None
        self.exported = None  # CheckpointInfo of the exported checkpoint

    def on_train_begin(self, logs=None):
        if self.source != "best":
            return
        checkpoint = _find_checkpoint_callback(self.model)
        if checkpoint is None or checkpoint.monitor is None:
            raise ValueError(
                'ExportSavedModel(source="best") needs a keras_ckpt.Checkpoint '
                "callback with `monitor` in the same fit() (e.g. "
                "keras_ckpt.Checkpoint(monitor='val_loss')), to know which "
                'checkpoint is best. Add one, or use source="latest".'
            )

    def on_train_end(self, logs=None):
        checkpoint = _find_checkpoint_callback(self.model)
        if checkpoint is not None:
            checkpoint.finalize(logs)  # the final checkpoint, committed
        if checkpoint is not None and checkpoint.preempted:
            if self.verbose:
                compat.print_msg(
                    "keras_ckpt: fit was preempted; not exporting.")
            return
        if not self.platform.is_chief:
            return
        if self.source == "best":
            if checkpoint is None or checkpoint.monitor is None:
                raise ValueError(
                    'ExportSavedModel(source="best") needs a '
                    "keras_ckpt.Checkpoint callback with `monitor` in the "
                    "same fit()."
                )
            self.exported_to = self._export_best(checkpoint)
            what = _describe(self.exported, checkpoint.monitor)
        else:
            # "latest" is the final checkpoint, which holds exactly the
            # weights the model has now.
            self.exported_to = self._export(self.model)
            final = getattr(checkpoint, "last_saved", None)
            if self.source == "latest" and final is not None:
                self.exported = CheckpointInfo.from_manifest(
                    final, path=os.path.join(checkpoint.directory,
                                             final.name))
                what = _describe(self.exported, checkpoint.monitor)
            else:
                what = "the in-memory model"
        if self.verbose:
            compat.print_msg(
                f"keras_ckpt: exported {what} ({self.source}) as a "
                f"SavedModel to {self.exported_to}")

    def _export(self, model):
        return export_lib.export_saved_model(
            model, self.export_dir, layout=self.layout, version=self.version,
            overwrite=self.overwrite,
        )

    def _export_best(self, checkpoint):
        from keras_ckpt import sources

        # The read path of restore() and load_model(): verified, and a
        # damaged best checkpoint falls back to the next best.
        found = sources.open_checkpoint(checkpoint.directory, "best",
                                        checkpoint.retention)
        self.exported = sources.info(found.manifest, found.store)
        training_state = state_lib.TrainingState(self.model)
        current = [v.numpy() for v in self.model.variables]
        arrays = found.store.read_arrays(found.manifest)
        try:
            training_state.assign(arrays, ["model"])
            return self._export(self.model)
        finally:
            # Hand the model back to the user with its final weights.
            for variable, value in zip(self.model.variables, current):
                variable.assign(value)


def _describe(info, monitor):
    value = info.metrics.get(monitor) if monitor else None
    metric = f", {monitor}={value:.6g}" if isinstance(value, float) else ""
    return f"{info.name} (step {info.step}{metric})"


def _find_checkpoint_callback(model):
    from keras_ckpt.callbacks import checkpoint as checkpoint_lib

    return checkpoint_lib.attached_to(model)
