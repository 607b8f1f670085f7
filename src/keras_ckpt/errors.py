"""Exceptions raised by keras_ckpt.

Every exception derives from `KerasCkptError` and also from the builtin a
caller would naturally catch (`FileNotFoundError`, `ValueError`, `OSError`,
`ImportError`), so `except OSError:` keeps working in user code.
"""


class KerasCkptError(Exception):
    """Base class of every error raised by keras_ckpt."""


class CheckpointNotFoundError(KerasCkptError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for."""


class IncompatibleCheckpointError(KerasCkptError, ValueError):
    """The checkpoint was written by a different model or optimizer."""


class CorruptCheckpointError(KerasCkptError, ValueError):
    """A checkpoint file is missing, truncated or fails its checksum."""


class CheckpointWriteError(KerasCkptError, OSError):
    """Writing a checkpoint failed (disk full, permission denied, ...).

    Earlier checkpoints are left untouched.
    """


class StorageError(KerasCkptError, OSError):
    """A remote store (S3, GCS, Azure Blob, file://) failed or refused access."""


class MissingDependencyError(KerasCkptError, ImportError):
    """An optional extra needed for this feature is not installed."""


class ExportExistsError(KerasCkptError, FileExistsError):
    """The export destination already holds a model; pass `overwrite=True`."""


class InvalidManifestError(CorruptCheckpointError):
    """A manifest read from a store fails the manifest schema.

    The checkpoint it describes is *invalid*: listed with this reason,
    skipped by resume, retention, `restore()` and export.
    """


class ConcurrentWriterError(CheckpointWriteError):
    """Another job took over the checkpoint directory or mirror prefix.

    One writer at a time: the job that started later wins, and the earlier
    one stops at its next save with this error, naming the other writer.
    """
