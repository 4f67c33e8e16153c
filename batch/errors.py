"""The exceptions the batch job raises; the CLI turns them into one-line errors."""
from __future__ import annotations

__all__ = ["BatchError", "DataError", "StorageError", "AnnounceError", "TrainingError",
           "LockError", "LockLostError"]


class BatchError(Exception):
    """Base class of batch-layer failures; ``str(err)`` is a complete one-line reason."""


class DataError(BatchError):
    """The input dataset cannot be trained on (schema, types, too few rows or classes)."""


class StorageError(BatchError):
    """The lake or the registry cannot be read or written."""


class AnnounceError(BatchError):
    """The model was published but its MODEL-REF could not be sent to Kafka."""


class TrainingError(BatchError):
    """Training failed (for example a distributed run lost a process)."""


class LockError(BatchError):
    """Another run holds the registry lock of the model: this run did not start (or, as
    :class:`LockLostError`, it lost the lock while it ran)."""


class LockLostError(LockError):
    """The run's registry lock was taken over while it ran: it stopped before publishing,
    announcing or pruning anything further."""
