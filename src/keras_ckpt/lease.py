"""One writer per checkpoint directory or mirror prefix: the writer lease.

Two jobs writing to one place delete each other's checkpoints (each one's
retention sees the other's as surplus). So each place holds a small lease
object, `.keras_ckpt-writer.json`, naming the job that writes there (host,
pid, start time and a random id). Taking it over is a compare-and-swap with
the store's conditional writes (S3 `If-Match`/`If-None-Match`, GCS
`ifGenerationMatch`, Azure ETags, an `O_EXCL` lock file locally), so of two
jobs starting at once exactly one holds it afterwards.

The rule is "the later job wins": a job starting (or restarted after a
preemption, on the same or a fresh machine) always takes the lease over, so
it is never blocked by its own earlier run, whatever the clocks of the two
hosts say (no clock is compared; of two jobs starting at once, the one whose
takeover lands last holds it); a job that finds, at its next
save, that another one holds the lease stops with `ConcurrentWriterError`
naming it, before it writes or deletes anything more.

The local directory and every mirror use the same code: each is a `Store`
(the local directory a `LocalStore`), and every store implements the
conditional writes (they are abstract in `Store`).
"""

import json
import logging
import os
import socket
import time
import uuid

from keras_ckpt.errors import ConcurrentWriterError
from keras_ckpt.errors import StorageError

logger = logging.getLogger("keras_ckpt")

LEASE_NAME = ".keras_ckpt-writer.json"
_ATTEMPTS = 20


def describe_job():
    """A new job identity: who is writing, for the other writer's error."""
    return {
        "id": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }


def _format(holder):
    holder = _valid(holder)
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
            if started is not None else "an unknown time")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {when}")


# Field -> check of a lease read from a store (untrusted: a field that
# fails is dropped, and the lease still names its holder by `id`).
_FIELDS = {
    "id": lambda v: isinstance(v, str) and 0 < len(v) <= 200,
    "host": lambda v: isinstance(v, str) and len(v) <= 255,
    "pid": lambda v: isinstance(v, int) and not isinstance(v, bool)
    and 0 <= v < 2**32,
    # Seconds since the epoch that `time.gmtime` can show: 1970 to 3000.
    "started": lambda v: isinstance(v, (int, float))
    and not isinstance(v, bool) and 0 <= v < 32503680000.0,
}


def _parse(data):
    """The lease's fields that pass their checks (`{}` if none do)."""
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return _valid(holder) if isinstance(holder, dict) else {}


def _valid(holder):
    return {key: value for key, value in holder.items()
            if key in _FIELDS and _FIELDS[key](value)}


class Lease:
    """The writer lease of one place (a local directory or a mirror prefix).

    Args:
        store: a `Store` (a local directory: a `LocalStore`).
        job: dict from `describe_job()`, the same for every place this job
            writes to.
        where: str, the place in messages (a directory or URL).
    """

    def __init__(self, store, job, where):
        self.store = store
        self.job = job
        self.where = where

    def acquire(self):
        """Takes the lease over (the later job wins); returns the previous
        holder (a dict) or None."""
        data = json.dumps(self.job, sort_keys=True).encode("utf-8")
        for _ in range(_ATTEMPTS):
            current, version = self.store.read_versioned(LEASE_NAME)
            holder = _parse(current) if current is not None else None
            if holder and holder.get("id") == self.job["id"]:
                return None
            # No clock is compared: the holder's `started` comes from
            # another host's clock (ahead by minutes, or crafted), and a
            # restarted job must never wait for it. The job whose takeover
            # lands last holds the lease; the compare-and-swap makes that
            # one job.
            if self.store.write_if(LEASE_NAME, data, version):
                if holder:
                    logger.info(
                        "keras_ckpt: took over %s from the job that wrote "
                        "there before (%s).", self.where, _format(holder),
                    )
                return holder
            # Someone else wrote it between our read and our write: look again.
        raise StorageError(
            f"Could not take over the writer lease {self.where}/{LEASE_NAME}: "
            f"it changed under every one of {_ATTEMPTS} conditional writes. "
            "Is another job restarting in a loop on the same place?"
        )

    def confirm(self):
        """Raises `ConcurrentWriterError` unless this job still holds the
        lease."""
        current = self.store.read_bytes(LEASE_NAME)
        holder = _parse(current) if current is not None else {}
        if holder.get("id") != self.job["id"]:
            raise self._lost(holder)

    def _lost(self, holder):
        other = _format(holder) if holder else "a job that removed the lease"
        return ConcurrentWriterError(
            f"Another job is writing checkpoints to {self.where} ({other}); "
            f"this job ({_format(self.job)}) stops so that neither deletes "
            "the other's checkpoints. If the other job is this one restarted "
            "(e.g. after a preemption), this one is obsolete; otherwise give "
            "each job its own `directory` and `mirror`."
        )
