"""keras_ckpt: fault-tolerant, cloud-native checkpointing for Keras 3.

One callback saves everything needed to continue training exactly, in the
background, mirrors each checkpoint to S3, GCS or Azure Blob, resumes a
preempted job on a fresh machine, and exports a servable SavedModel.
"""

__version__ = "0.1.0"

from keras_ckpt.callbacks.checkpoint import Checkpoint
from keras_ckpt.callbacks.export import ExportSavedModel
from keras_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExportExistsError,
    IncompatibleCheckpointError,
    KerasCkptError,
    MissingDependencyError,
    StorageError,
)
from keras_ckpt.export import export_saved_model
from keras_ckpt.manifest import CheckpointInfo
from keras_ckpt.platforms import Platform, detect_platform
from keras_ckpt.restoring import list_checkpoints, restore
from keras_ckpt.uploaders import Uploader, get_uploader, register_uploader

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "ExportExistsError",
    "ExportSavedModel",
    "IncompatibleCheckpointError",
    "KerasCkptError",
    "MissingDependencyError",
    "Platform",
    "StorageError",
    "Uploader",
    "detect_platform",
    "export_saved_model",
    "get_uploader",
    "list_checkpoints",
    "register_uploader",
    "restore",
]
