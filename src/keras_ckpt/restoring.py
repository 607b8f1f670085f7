"""`restore()`: a checkpoint into a model outside `fit()`."""

import tempfile

from keras_ckpt import _keras_compat as compat
from keras_ckpt import manager as manager_lib
from keras_ckpt import manifest as manifest_lib
from keras_ckpt import sources
from keras_ckpt.engine import state as state_lib
from keras_ckpt.errors import IncompatibleCheckpointError


def restore(model, source, checkpoint="latest", optimizer=True, monitor=None,
            mode="auto"):
    """Restores a model (and its optimizer) from a keras_ckpt checkpoint.

    Use it to fine-tune, evaluate, or branch a hyperparameter trial from any
    stored checkpoint. The model must be built with the same architecture;
    the optimizer is built first if needed so its slots are restored too.
    Nothing is assigned unless every variable matches.

    Args:
        model: a built `keras.Model`.
        source: a checkpoint directory, a checkpoint path (`.../ckpt-120`),
            or a URL of either.
        checkpoint: `"latest"`, `"best"` (needs `monitor`), or a step (int)
            or name (`"ckpt-120"`). Ignored when `source` names a checkpoint.
            Its files are verified (sizes and CRC32C checksums) first; with
            `"latest"` or `"best"`, a damaged checkpoint is skipped with one
            warning naming it and the previous (next best) valid one is
            restored. Defaults to `"latest"`.
        optimizer: bool, also restore the optimizer's variables (iterations,
            moments, learning rate). Defaults to True.
        monitor: str or None, the metric ranking checkpoints for
            `checkpoint="best"`.
        mode: `"auto"`, `"min"` or `"max"`, for `monitor`.

    Returns:
        The `CheckpointInfo` of the restored checkpoint.

    Raises:
        CheckpointNotFoundError: no such (complete) checkpoint.
        IncompatibleCheckpointError: it was written by a different model.
        CorruptCheckpointError: the checkpoint named by step or name is
            damaged, or every candidate for "latest"/"best" is.

    Example:

    >>> info = keras_ckpt.restore(model, "checkpoints", checkpoint="best",
    ...                           monitor="val_loss")
    >>> print(f"restored step {info.step} (val_loss={info.metrics['val_loss']})")
    """
    if checkpoint == "best" and monitor is None:
        raise ValueError(
            'Invalid value for argument `checkpoint`. checkpoint="best" needs '
            "`monitor` (e.g. monitor='val_loss')."
        )
    retention = manager_lib.RetentionPolicy(
        monitor=monitor, mode=manager_lib.resolve_mode(monitor, mode)
    )
    with tempfile.TemporaryDirectory(prefix="keras_ckpt-restore-") as tmp:
        found = sources.open_checkpoint(source, checkpoint, retention,
                                        download_dir=tmp)
        assign(model, found.manifest, found.store, optimizer)
    if sources.is_remote(found.origin):  # its download is gone
        return manifest_lib.CheckpointInfo.from_manifest(
            found.manifest, url=found.origin)
    return sources.info(found.manifest, found.store)


def assign(model, manifest, store, optimizer):
    """Assigns a verified checkpoint's weights (and optimizer state) to
    `model`; nothing is assigned unless every variable matches."""
    if not model.built:
        raise ValueError(
            f"Build the model before restoring {store.prefix(manifest.name)}: "
            "use keras.Input(...) or call it on a batch of data."
        )
    opt = getattr(model, "optimizer", None)
    restore_optimizer = bool(optimizer) and opt is not None and bool(
        manifest.variables.get("optimizer")
    )
    if restore_optimizer and not compat.optimizer_built(opt):
        opt.build(model.trainable_variables)
    training_state = state_lib.TrainingState(model)
    training_state.check_compatible(
        manifest.variables, store.prefix(manifest.name),
        include_optimizer=False,
    )
    if restore_optimizer:
        try:
            training_state.check_compatible(
                manifest.variables, store.prefix(manifest.name))
        except IncompatibleCheckpointError as e:
            # The weights match: only the optimizer differs.
            raise IncompatibleCheckpointError(
                f"{e} The model's weights match; to restore them without the "
                f"optimizer state, call restore(..., optimizer=False)."
            ) from None
    # Verified (checksums) when it was chosen or downloaded.
    arrays = store.read_arrays(manifest)
    groups = ["model"] + (["optimizer"] if restore_optimizer else [])
    training_state.assign(arrays, groups)
