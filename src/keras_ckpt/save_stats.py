"""What each save cost: `Checkpoint.stats` and TensorBoard scalars."""

import dataclasses
import os

# Scalar tag -> SaveStats field, written to the TensorBoard run directory.
SCALARS = {
    "keras_ckpt/save_blocking_seconds": "blocking_seconds",
    "keras_ckpt/save_write_seconds": "write_seconds",
    "keras_ckpt/save_bytes": "bytes",
    "keras_ckpt/save_upload_seconds": "upload_seconds",
    "keras_ckpt/mirror_lag_seconds": "mirror_lag_seconds",
}


@dataclasses.dataclass(frozen=True)
class SaveStats:
    """The cost of one committed checkpoint, one entry of `Checkpoint.stats`.

    Attributes:
        name: str, the checkpoint (`"ckpt-120"`).
        step: int, the global batch count it holds (TensorBoard's step axis).
        epoch: int, its epoch (0-based position, as in `CheckpointInfo`).
        batch: int, its batch within `epoch`.
        bytes: int, the size of its files.
        blocking_seconds: float, time the training loop stood still for it
            (the snapshot to host memory, plus waiting for an earlier save
            with `when_busy="wait"`; the whole save with `async_save=False`).
        write_seconds: float, time to write and commit it locally (and apply
            retention), on the background thread with `async_save=True`.
        upload_seconds: float or None, time to copy it to the mirror (None
            without a mirror).
        mirror_lag_seconds: float or None, from the moment the save was
            requested until the mirror held it committed (None without a
            mirror).
    """

    name: str
    step: int
    epoch: int
    batch: int
    bytes: int
    blocking_seconds: float
    write_seconds: float
    upload_seconds: float = None
    mirror_lag_seconds: float = None


class TensorBoardScalars:
    """Writes `SaveStats` next to a `keras.callbacks.TensorBoard` run.

    The scalars go to the callback's `train` run directory (the one Keras
    writes `epoch_loss` to), with the global step as their step.
    """

    def __init__(self, tensorboard):
        self.directory = os.path.join(str(tensorboard.log_dir), "train")
        self._writer = None

    def write(self, records):
        if not records:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.directory)
        with self._writer.as_default():
            for record in records:
                for tag, field in SCALARS.items():
                    value = getattr(record, field)
                    if value is not None:
                        tf.summary.scalar(tag, float(value), step=record.step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
