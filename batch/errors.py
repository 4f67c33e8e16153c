"""The exceptions the batch job raises; the CLI turns them into one-line errors.

Bad data and unreachable storage are the lake's errors (:mod:`lake.errors`), raised the same
by the reader and by the job's own steps.
"""
from __future__ import annotations

from app.errors import StratumError
from lake.errors import DataError, LakeError, StorageError

__all__ = ["BatchError", "LakeError", "DataError", "StorageError", "AnnounceError",
           "TrainingError", "NetworkError", "LockError", "LockLostError"]


class BatchError(StratumError):
    """Base class of batch-layer failures; ``str(err)`` is a complete one-line reason."""


class AnnounceError(BatchError):
    """The model was published but its MODEL-REF could not be sent to Kafka."""


class TrainingError(BatchError):
    """Training failed (for example a distributed run lost a process)."""


class NetworkError(BatchError):
    """The network to train (``BATCH_MODEL``, ``BATCH_MODEL_PARAMS``) cannot be imported, built
    or used for the task; raised before any training."""


class LockError(BatchError):
    """Another run holds the registry lock of the model: this run did not start (or, as
    :class:`LockLostError`, it lost the lock while it ran)."""


class LockLostError(LockError):
    """The run's registry lock was taken over while it ran: it stopped before publishing,
    announcing or pruning anything further."""
