"""`restore()` and `list_checkpoints()`: checkpoints outside `fit()`."""

import os
import tempfile

from keras_ckpt import _keras_compat as compat
from keras_ckpt import manager as manager_lib
from keras_ckpt import sources
from keras_ckpt import state as state_lib
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import IncompatibleCheckpointError


def list_checkpoints(source):
    """Lists the checkpoints in a local directory or a mirror URL.

    Args:
        source: str or path-like, a local checkpoint directory or a URL
            (`s3://bucket/prefix`, `gs://...`, `az://container/prefix`,
            `file:///path`).

    Returns:
        A list of `CheckpointInfo`, oldest first, for local directories and
        URLs alike. Checkpoints that cannot be restored are listed too, with
        `complete=False` and the reason in `problems`: a file missing or
        truncated (an interrupted save or upload), or an invalid manifest
        (see the manifest schema in the docs). Listing never raises because
        of one bad checkpoint.

    Example:

    >>> for info in keras_ckpt.list_checkpoints("checkpoints"):
    ...     print(info.step, info.epoch, info.batch, info.metrics)
    """
    if sources.is_remote(source):
        from keras_ckpt.uploaders import get_uploader

        return get_uploader(str(source)).list_checkpoints()
    path = str(source).removeprefix("file://") if isinstance(source, str) else source
    store, _ = sources.local_source(path)
    return store.list_checkpoints()


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
    if sources.is_remote(source):
        from keras_ckpt.uploaders import get_uploader

        base, name = sources.split_checkpoint_url(str(source))
        with tempfile.TemporaryDirectory(prefix="keras_ckpt-restore-") as tmp:
            manifest, store = sources.fetch_remote(
                get_uploader(base), name or checkpoint, tmp, retention
            )
            _assign(model, manifest, store, optimizer)
            return manifest_info(manifest, f"{base}/{manifest.name}")
    path = str(source).removeprefix("file://") if isinstance(source, str) else source
    store, name = sources.local_source(path)
    damaged = {}
    manifest = sources.pick_verified(
        store, store.manifests(), name or checkpoint, retention,
        store.directory, damaged,
    )
    if manifest is None:
        raise CorruptCheckpointError(
            f"Every checkpoint in {store.directory} is damaged, nothing to "
            "restore: " + "; ".join(f"{n}: {r}" for n, r in damaged.items())
        )
    _assign(model, manifest, store, optimizer)
    return sources.info(manifest, store)


def manifest_info(manifest, url):
    from keras_ckpt.manifest import CheckpointInfo

    return CheckpointInfo.from_manifest(manifest, url=url)


def _assign(model, manifest, store, optimizer):
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
