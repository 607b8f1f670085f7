"""Background writing: one save in flight, errors re-raised on the caller.

The training thread takes a snapshot (see `state.py`) and hands a job to
`BackgroundWriter.submit()`; the job writes the files, commits, applies
retention and mirrors, on a background thread. As in Orbax's async
checkpointer, the background thread never swallows an exception: it stores
it and `check_for_errors()` re-raises it on the training thread at the next
batch or epoch boundary; `wait_until_finished()` flushes.

The thread keeps the process's scheduling priority. The write runs on this
thread (`bundle.py`; TensorFlow's own writer, before it, also ran its kernels
on the calling thread), so a lower priority for this thread alone would reach
the whole write; measured, it did not speed up training next to a write, and
it slowed the write (and the final flush) wherever other processes took the
CPUs; see "What each lever bought" in docs/performance.md.
"""

import threading
import time

from keras_ckpt.errors import CheckpointWriteError

WHEN_BUSY = ("wait", "skip")


class BackgroundWriter:
    """Runs one job at a time on a background thread.

    Args:
        name: str, the thread name shown in stack dumps.
    """

    def __init__(self, name="keras_ckpt-writer"):
        self._name = name
        self._thread = None
        self._error = None
        self._lock = threading.Lock()
        self.last_duration = None

    @property
    def busy(self):
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(self, job, when_busy="wait"):
        """Starts `job()` in the background once the previous job is done.

        Args:
            job: callable with no arguments.
            when_busy: "wait" blocks until the job in flight finishes;
                "skip" returns False at once without running `job`.

        Returns:
            True if `job` was started.
        """
        if self.busy:
            if when_busy == "skip":
                return False
            self.wait_until_finished()
        self.check_for_errors()
        thread = threading.Thread(
            target=self._run, args=(job,), name=self._name, daemon=False
        )
        self._thread = thread
        thread.start()
        return True

    def _run(self, job):
        start = time.perf_counter()
        try:
            job()
        except BaseException as e:  # surfaced by check_for_errors()
            with self._lock:
                self._error = e
        finally:
            self.last_duration = time.perf_counter() - start

    def check_for_errors(self):
        """Re-raises, once, the exception of a finished background job."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def join(self, timeout=None):
        """Waits up to `timeout` s for the job in flight, without raising.

        Returns:
            True if no job is running any more.
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def wait_until_finished(self, timeout=None):
        """Waits for the job in flight; raises its error, if any.

        Args:
            timeout: float seconds or None (wait as long as it takes).

        Raises:
            CheckpointWriteError: the job is still running after `timeout`.
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise still_writing(timeout)
        self.check_for_errors()


def still_writing(timeout):
    """The error of a flush that timed out after `timeout` s."""
    return CheckpointWriteError(
        f"A checkpoint is still being written after {timeout:g} s; it will "
        "not be marked as latest until it completes. Raise the time limit "
        "(`flush_timeout`, or `preemption_grace_seconds` on preemption) to "
        "wait longer."
    )
