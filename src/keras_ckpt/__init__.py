"""keras_ckpt: fault-tolerant, cloud-native checkpointing for Keras 3.

One callback saves everything needed to continue training exactly, in the
background, mirrors each checkpoint to S3, GCS or Azure Blob, resumes a
preempted job on a fresh machine, and exports a servable SavedModel.
"""

import importlib
import typing

__version__ = "0.1.0"

if typing.TYPE_CHECKING:  # for type checkers, IDEs and the API reference
    from keras_ckpt.callbacks.checkpoint import Checkpoint
    from keras_ckpt.callbacks.export import ExportSavedModel
    from keras_ckpt.engine.checkpoint_manager import CheckpointManager
    from keras_ckpt.engine.policies import KeepBest
    from keras_ckpt.engine.policies import KeepEveryNHours
    from keras_ckpt.engine.policies import KeepLast
    from keras_ckpt.engine.policies import SaveAtEpochEnd
    from keras_ckpt.engine.policies import SaveEveryNSeconds
    from keras_ckpt.engine.policies import SaveEveryNSteps
    from keras_ckpt.errors import CheckpointNotFoundError
    from keras_ckpt.errors import CheckpointWriteError
    from keras_ckpt.errors import ConcurrentWriterError
    from keras_ckpt.errors import CorruptCheckpointError
    from keras_ckpt.errors import ExportExistsError
    from keras_ckpt.errors import IncompatibleCheckpointError
    from keras_ckpt.errors import InvalidManifestError
    from keras_ckpt.errors import KerasCkptError
    from keras_ckpt.errors import MissingDependencyError
    from keras_ckpt.errors import StorageError
    from keras_ckpt.export import export_saved_model
    from keras_ckpt.loading import load_model
    from keras_ckpt.manifest import CheckpointInfo
    from keras_ckpt.platforms import Platform
    from keras_ckpt.platforms import detect_platform
    from keras_ckpt.sources import list_checkpoints
    from keras_ckpt.restoring import restore
    from keras_ckpt.store import Store
    from keras_ckpt.store import Uploader
    from keras_ckpt.store import get_uploader
    from keras_ckpt.store import register_uploader

# Public name -> module that defines it. Imported on first use (PEP 562), so
# that `import keras_ckpt` and the TensorFlow-free CLI commands (`ls`,
# `verify`, `pull`, `push`, `prune`) do not pay for importing TensorFlow.
_EXPORTS = {
    "Checkpoint": "keras_ckpt.callbacks.checkpoint",
    "CheckpointInfo": "keras_ckpt.manifest",
    "CheckpointManager": "keras_ckpt.engine.checkpoint_manager",
    "CheckpointNotFoundError": "keras_ckpt.errors",
    "CheckpointWriteError": "keras_ckpt.errors",
    "ConcurrentWriterError": "keras_ckpt.errors",
    "CorruptCheckpointError": "keras_ckpt.errors",
    "ExportExistsError": "keras_ckpt.errors",
    "ExportSavedModel": "keras_ckpt.callbacks.export",
    "IncompatibleCheckpointError": "keras_ckpt.errors",
    "InvalidManifestError": "keras_ckpt.errors",
    "KeepBest": "keras_ckpt.engine.policies",
    "KeepEveryNHours": "keras_ckpt.engine.policies",
    "KeepLast": "keras_ckpt.engine.policies",
    "KerasCkptError": "keras_ckpt.errors",
    "MissingDependencyError": "keras_ckpt.errors",
    "Platform": "keras_ckpt.platforms",
    "SaveAtEpochEnd": "keras_ckpt.engine.policies",
    "SaveEveryNSeconds": "keras_ckpt.engine.policies",
    "SaveEveryNSteps": "keras_ckpt.engine.policies",
    "StorageError": "keras_ckpt.errors",
    "Store": "keras_ckpt.store",
    "Uploader": "keras_ckpt.store",
    "detect_platform": "keras_ckpt.platforms",
    "export_saved_model": "keras_ckpt.export",
    "get_uploader": "keras_ckpt.store",
    "list_checkpoints": "keras_ckpt.sources",
    "load_model": "keras_ckpt.loading",
    "register_uploader": "keras_ckpt.store",
    "restore": "keras_ckpt.restoring",
}

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "ExportExistsError",
    "ExportSavedModel",
    "IncompatibleCheckpointError",
    "InvalidManifestError",
    "KeepBest",
    "KeepEveryNHours",
    "KeepLast",
    "KerasCkptError",
    "MissingDependencyError",
    "Platform",
    "SaveAtEpochEnd",
    "SaveEveryNSeconds",
    "SaveEveryNSteps",
    "StorageError",
    "Store",
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
