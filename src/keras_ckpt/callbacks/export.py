"""`keras_ckpt.ExportSavedModel`: a servable model at the end of a completed fit."""

from keras.src.utils import io_utils

from keras_ckpt import distribute
from keras_ckpt import export as export_lib
from keras_ckpt import state as state_lib

SOURCES = ("latest", "best", "model")
LAYOUTS = ("auto",) + export_lib.LAYOUTS


class ExportSavedModel(distribute.Callback):
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
            `monitor`), or `"model"` (the in-memory model as is).
            Defaults to `"latest"`.
        layout: `"auto"` (the detected platform's), `"plain"`, `"sagemaker"`
            or `"vertex"`. Defaults to `"auto"`.
        version: int or None, the numeric version directory for `"plain"`
            and `"sagemaker"` layouts; must be None for `"vertex"`.
            Defaults to None, meaning 1.
        overwrite: bool, replace an earlier export at the same place (a
            restarted job exports again). Defaults to True.
        verbose: 0 or 1. Defaults to 1.

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
        if source not in SOURCES:
            raise ValueError(
                f"Invalid value for argument `source`. Received: "
                f"source={source!r}. Expected one of {SOURCES}."
            )
        if layout not in LAYOUTS:
            raise ValueError(
                f"Invalid value for argument `layout`. Received: "
                f"layout={layout!r}. Expected one of {LAYOUTS}."
            )
        from keras_ckpt.platforms import detect_platform

        self.platform = detect_platform()
        self.layout = self.platform.export_layout if layout == "auto" else layout
        export_lib._validate_version(version, self.layout)
        self.export_dir = export_dir if export_dir is not None else (
            self.platform.model_dir
        )
        self.source = source
        self.version = version
        self.overwrite = overwrite
        self.verbose = verbose
        self.exported_to = None

    def on_train_end(self, logs=None):
        checkpoint = _find_checkpoint_callback(self.model)
        if checkpoint is not None:
            checkpoint.finalize(logs)  # the final checkpoint, committed
        if checkpoint is not None and checkpoint.preempted:
            if self.verbose:
                io_utils.print_msg(
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
        else:
            # "latest" is the final checkpoint, which holds exactly the
            # weights the model has now.
            self.exported_to = self._export(self.model)
        if self.verbose:
            io_utils.print_msg(
                f"keras_ckpt: exported a SavedModel ({self.source}) to "
                f"{self.exported_to}")

    def _export(self, model):
        return export_lib.export_saved_model(
            model, self.export_dir, layout=self.layout, version=self.version,
            overwrite=self.overwrite,
        )

    def _export_best(self, checkpoint):
        from keras_ckpt import sources

        store = checkpoint._store
        manifest = sources.pick(store.manifests(), "best",
                                checkpoint.retention, store.directory)
        training_state = state_lib.TrainingState(self.model)
        current = [v.numpy() for v in self.model.variables]
        arrays = store.read_arrays(manifest, verify=True)
        try:
            training_state.assign(arrays, ["model"])
            return self._export(self.model)
        finally:
            # Hand the model back to the user with its final weights.
            for variable, value in zip(self.model.variables, current):
                variable.assign(value)


def _find_checkpoint_callback(model):
    return getattr(model, "_keras_ckpt_checkpoint", None)
