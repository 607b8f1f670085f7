"""`load_model()`: a model rebuilt from a checkpoint, without the training script."""

import tempfile

from keras_ckpt import manager as manager_lib
from keras_ckpt import restoring
from keras_ckpt import sources
from keras_ckpt.errors import KerasCkptError

_NO_CONFIG = (
    "the checkpoint was written by a subclassed model without get_config() "
    "(or by tf_keras); build the model in Python, then call "
    "keras_ckpt.restore(model, ...) (and keras_ckpt.export_saved_model to "
    "export it)"
)


def load_model(source, checkpoint="latest", monitor=None, mode="auto",
               custom_objects=None, compile=True):
    """Rebuilds a model from a checkpoint's stored config and restores it.

    Like `keras.models.load_model`, for a keras_ckpt checkpoint: the model's
    config saved in the manifest is deserialized with `safe_mode=True`,
    built, and its weights (and, with `compile=True`, its optimizer state)
    are restored, so it can predict, be evaluated or fine-tuned without the
    training script.

    Args:
        source: str or path-like, a checkpoint directory, a checkpoint path
            (`.../ckpt-120`), or a URL of either (`s3://`, `gs://`, `az://`,
            `file://`).
        checkpoint: `"latest"`, `"best"` (needs `monitor`), or a step (int)
            or name (`"ckpt-120"`). Ignored when `source` names a checkpoint.
            Defaults to `"latest"`.
        monitor: str or None, the metric ranking checkpoints for
            `checkpoint="best"`. Defaults to None.
        mode: `"auto"`, `"min"` or `"max"`, for `monitor`. Defaults to
            `"auto"`.
        custom_objects: dict or None, `{"name": class_or_function}` for the
            custom layers, losses and metrics of the model, as in
            `keras.models.load_model`; classes registered with
            `@keras.saving.register_keras_serializable()` need not be
            listed. Defaults to None.
        compile: bool, compile the model as it was trained (loss, metrics,
            optimizer) and restore the optimizer's state (iterations,
            moments, learning rate). Defaults to True.

    Returns:
        The rebuilt `keras.Model`, with the checkpoint's weights.

    Raises:
        CheckpointNotFoundError: no such (complete) checkpoint.
        KerasCkptError: the checkpoint stores no model config, or the config
            cannot be rebuilt (an unknown custom class).
        CorruptCheckpointError: its files are damaged.

    Example:

    ```python
    model = keras_ckpt.load_model("s3://my-bucket/run-1", checkpoint="best",
                                  monitor="val_loss")
    model.predict(x)
    ```
    """
    from keras_ckpt import _args

    if checkpoint == "best" and monitor is None:
        _args.invalid("checkpoint", checkpoint, 'a step, "latest", or '
                      '"best" together with `monitor`',
                      'checkpoint="best" needs `monitor`. ')
    if not isinstance(compile, bool):
        _args.invalid("compile", compile, "True or False")
    if custom_objects is not None and not isinstance(custom_objects, dict):
        _args.invalid("custom_objects", custom_objects, "a dict or None")
    retention = manager_lib.RetentionPolicy(
        monitor=monitor, mode=manager_lib.resolve_mode(monitor, mode))
    model, _ = load(source, checkpoint, retention, custom_objects, compile)
    return model


def load(source, checkpoint="latest", retention=None, custom_objects=None,
         compile=True):
    """`load_model()`'s work: `(model, found)`, where `found` is the
    `sources.Found` checkpoint it was restored from (read through the one
    verified read path, `sources.open_checkpoint`)."""
    with tempfile.TemporaryDirectory(prefix="keras_ckpt-load-") as tmp:
        found = sources.open_checkpoint(source, checkpoint, retention,
                                        download_dir=tmp)
        location = found.origin
        model = rebuild_model(found.manifest, location, custom_objects,
                              compile)
        restoring.assign(model, found.manifest, found.store,
                         optimizer=compile)
    return model, found


def rebuild_model(manifest, location, custom_objects=None, compile=True):
    """The model of `manifest`'s stored config, built, weights not restored.

    `location` (the checkpoint's path or URL) is for messages.
    """
    import keras

    config = (manifest.metadata or {}).get("model_config")
    if not config:
        raise KerasCkptError(
            f"Cannot rebuild a model from {location}: no model config is "
            f"stored in its manifest; {_NO_CONFIG}."
        )
    if not compile:
        config = {k: v for k, v in config.items() if k != "compile_config"}
    # The config comes from a store: never run code it names (Lambda
    # layers, arbitrary functions). `safe_mode=True` alone is overridden by
    # a process-wide `keras.config.enable_unsafe_deserialization()`; the
    # scope is not. Keras >= 3.14 has no known safe_mode bypass.
    from keras_ckpt import _keras_compat as compat

    try:
        with compat.safe_mode_scope():
            model = keras.saving.deserialize_keras_object(
                config, custom_objects=custom_objects, safe_mode=True)
    except Exception as e:
        text = " ".join(str(e).split())
        raise KerasCkptError(
            f"Could not rebuild the model from the config stored in "
            f"{location}: {text} If it uses custom classes, pass them in "
            "`custom_objects` or register them with "
            "@keras.saving.register_keras_serializable() before loading."
        ) from e
    if not getattr(model, "built", False):
        raise KerasCkptError(
            f"The model rebuilt from {location} has no stored input shape, "
            f"so it cannot be built; {_NO_CONFIG}."
        )
    return model
