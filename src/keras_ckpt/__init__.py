"""keras_ckpt: fault-tolerant, cloud-native checkpointing for Keras 3.

One callback saves everything needed to continue training exactly, in the
background, mirrors each checkpoint to S3, GCS or Azure Blob, resumes a
preempted job on a fresh machine, and exports a servable SavedModel.
"""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Imported on first use (PEP 562), so
# that `import keras_ckpt` and the TensorFlow-free CLI commands (`ls`,
# `verify`, `pull`, `push`, `prune`) do not pay for importing TensorFlow.
_EXPORTS = {
    "Checkpoint": "keras_ckpt.callbacks.checkpoint",
    "CheckpointInfo": "keras_ckpt.manifest",
    "CheckpointNotFoundError": "keras_ckpt.errors",
    "CheckpointWriteError": "keras_ckpt.errors",
    "CorruptCheckpointError": "keras_ckpt.errors",
    "ExportExistsError": "keras_ckpt.errors",
    "ExportSavedModel": "keras_ckpt.callbacks.export",
    "IncompatibleCheckpointError": "keras_ckpt.errors",
    "KerasCkptError": "keras_ckpt.errors",
    "MissingDependencyError": "keras_ckpt.errors",
    "Platform": "keras_ckpt.platforms",
    "StorageError": "keras_ckpt.errors",
    "Uploader": "keras_ckpt.uploaders",
    "detect_platform": "keras_ckpt.platforms",
    "export_saved_model": "keras_ckpt.export",
    "get_uploader": "keras_ckpt.uploaders",
    "list_checkpoints": "keras_ckpt.restoring",
    "load_model": "keras_ckpt.loading",
    "register_uploader": "keras_ckpt.uploaders",
    "restore": "keras_ckpt.restoring",
}

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
    "load_model",
    "register_uploader",
    "restore",
]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
