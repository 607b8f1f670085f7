"""keras_ckpt: fault-tolerant, cloud-native checkpointing for Keras 3."""

__version__ = "0.1.0"

from keras_ckpt.callbacks.checkpoint import Checkpoint
from keras_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    KerasCkptError,
    MissingDependencyError,
    StorageError,
)
from keras_ckpt.manifest import CheckpointInfo
from keras_ckpt.restoring import list_checkpoints, restore

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "KerasCkptError",
    "MissingDependencyError",
    "StorageError",
    "list_checkpoints",
    "restore",
]
