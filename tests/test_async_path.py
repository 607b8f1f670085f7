"""Issue #12, src side: what the async path does when it must hurry.

- An upload cancelled mid-way never looks complete on any store (the
  manifest goes last), and earlier checkpoints stay intact.
- A preemption supersedes the upload in flight: the preemption checkpoint
  reaches the mirror first; the superseded one stays committed locally and
  `keras-ckpt push` (or the next run) completes the mirror.
- The preemption budget is a hard limit: at the deadline the process exits
  143 with one line naming what the mirror lacks and the push command.
- A long end-of-fit flush says what it is waiting for.
"""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import keras_ckpt
from keras_ckpt.store import get_uploader
from keras_ckpt.store.base import UploadCancelled
from keras_ckpt.store.local import LocalStore

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = dict(retries=1, backoff=0.01, max_backoff=0.05, timeout=5,
            request_retries=0, check_timeout=2)


def make_model(units=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def data(n=48):
    rng = np.random.RandomState(1)
    x = rng.rand(n, 4).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def complete_on(url):
    return [m.name for m in get_uploader(url, **FAST).complete_manifests()]


def local_complete(directory):
    store = keras_ckpt.Checkpoint(directory=str(directory), on_preemption=None)
    return [m.name for m in store._store.manifests()]


# --- an upload cut short never commits -------------------------------------


def test_cancelled_upload_never_looks_complete(mirror_url, tmp_path):
    x, y = data()
    local = tmp_path / "local"
    # Two committed local checkpoints, the first one mirrored.
    ckpt = keras_ckpt.Checkpoint(directory=str(local), save_freq=3,
                                 max_to_keep=5, on_preemption=None, verbose=0)
    make_model().fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ckpt])
    first, *_, last = local_complete(local)
    uploader = get_uploader(mirror_url, **FAST)
    uploader.upload_checkpoint(str(local), first)
    uploader.commit([first])

    cancel = threading.Event()
    sent = []

    def progress(n):
        sent.append(n)
        cancel.set()  # cancelled as soon as the first bytes went out

    with pytest.raises(UploadCancelled, match=re.escape(last)):
        uploader.upload_checkpoint(str(local), last, progress=progress,
                                   cancel=cancel)
    assert sent, "the upload started before it was cancelled"
    fresh = get_uploader(mirror_url, **FAST)
    assert complete_on(mirror_url) == [first]
    assert fresh.latest_complete() == first
    assert fresh.read_bytes(f"{last}.json") is None
    # Completed later, as `keras-ckpt push` does.
    fresh.push(str(local))
    assert last in complete_on(mirror_url)


def test_cancel_before_upload_sends_nothing(file_url, tmp_path):
    x, y = data(16)
    local = tmp_path / "local"
    ckpt = keras_ckpt.Checkpoint(directory=str(local), on_preemption=None,
                                 verbose=0)
    make_model().fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ckpt])
    (name,) = local_complete(local)
    cancel = threading.Event()
    cancel.set()
    uploader = get_uploader(file_url, **FAST)
    with pytest.raises(UploadCancelled):
        uploader.mirror(str(local), name, [name], cancel=cancel)
    assert uploader.list_files() == {}


# --- preemption supersedes the upload in flight ----------------------------


class SlowLink(LocalStore):
    """A file:// mirror behind a slow link: each data file takes `seconds`
    to go through, reporting progress as it goes (as the cloud SDKs do)."""

    seconds = 3.0

    def _upload_file(self, local_path, name, progress=None):
        if ".data-" in name:
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                time.sleep(0.05)
                if progress is not None:
                    progress(0)
        return super()._upload_file(local_path, name, progress)


class SigtermAt(keras.callbacks.Callback):
    """SIGTERMs this process after batch `step` once a save is in flight."""

    def __init__(self, ckpt, step):
        super().__init__()
        self.ckpt, self.step, self.sent = ckpt, step, False

    def on_train_batch_end(self, batch, logs=None):
        if not self.sent and batch + 1 >= self.step and self.ckpt._writer.busy:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_preemption_supersedes_the_upload_in_flight(file_url, tmp_path,
                                                    caplog):
    x, y = data()
    local = tmp_path / "local"
    mirror = SlowLink(file_url, options=keras_ckpt.store.UploaderOptions(
        **FAST))
    ckpt = keras_ckpt.Checkpoint(
        directory=str(local), mirror=mirror, save_freq=2, max_to_keep=5,
        save_on_epoch_end=False, on_preemption="stop",
        preemption_grace_seconds=60, verbose=0)
    killer = SigtermAt(ckpt, 3)
    with caplog.at_level("WARNING", logger="keras_ckpt"):
        make_model().fit(x, y, batch_size=8, epochs=1, verbose=0,
                         callbacks=[ckpt, killer])
    assert killer.sent and ckpt.preempted
    # ckpt-2 was being uploaded at the signal; the preemption checkpoint is
    # ckpt-3. Both are committed locally; the mirror got ckpt-3, and ckpt-2
    # is not complete there (its upload stopped before its manifest).
    assert local_complete(local) == ["ckpt-2", "ckpt-3"]
    assert ckpt.last_saved.name == "ckpt-3"
    assert complete_on(file_url) == ["ckpt-3"]
    assert get_uploader(file_url, **FAST).latest_complete() == "ckpt-3"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "ckpt-2" in warning
    assert f"keras-ckpt push {local} {file_url}" in warning
    # Nothing committed is lost: the push the message names completes it.
    get_uploader(file_url, **FAST).push(str(local))
    assert complete_on(file_url) == ["ckpt-2", "ckpt-3"]


def test_next_run_heals_a_superseded_upload(file_url, tmp_path):
    x, y = data()
    local = tmp_path / "local"
    options = keras_ckpt.store.UploaderOptions(**FAST)

    def run(extra, mirror, epochs=1):
        ckpt = keras_ckpt.Checkpoint(
            directory=str(local), mirror=mirror, save_freq=2, max_to_keep=20,
            save_on_epoch_end=False, on_preemption="stop", verbose=0)
        make_model().fit(x, y, batch_size=8, epochs=epochs, verbose=0,
                         callbacks=[ckpt, *extra(ckpt)])
        return ckpt

    first = run(lambda c: [SigtermAt(c, 3)], SlowLink(file_url,
                                                       options=options))
    assert first.preempted and complete_on(file_url) == ["ckpt-3"]
    second = run(lambda c: [], get_uploader(file_url, **FAST), epochs=2)
    assert second.restored.name == "ckpt-3"
    # The first save of the resumed run uploaded what the mirror lacked.
    assert "ckpt-2" in complete_on(file_url)
    assert second._committer.unmirrored == []


# --- the hard deadline ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("proxied_mirror", ["s3"], indirect=True)
def test_deadline_exits_143_and_names_what_the_mirror_lacks(
        proxied_mirror, tmp_path, subprocess_env):
    """SIGTERM while the mirror's link stalls every upload: the process
    exits 143 at the budget's end (not after the SDK's timeouts and
    retries, minutes later) with one line naming the preemption checkpoint,
    its unsent files and the push command; earlier checkpoints stay intact
    on the mirror and the push completes it."""
    url, proxy = proxied_mirror.url, proxied_mirror.proxy
    local = tmp_path / "local"
    grace = 4
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "scripts", "train.py"),
         "--dir", str(local), "--mirror", url, "--save-freq", "6",
         "--epochs", "200", "--batch-sleep", "0.2", "--grace", str(grace)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        mirrored = None
        for line in iter(proc.stdout.readline, ""):
            match = re.search(r"saved (ckpt-\d+) .* and " + re.escape(url),
                              line)
            if match:
                mirrored = match.group(1)
                break
        assert mirrored, proc.stderr.read()[-3000:]
        # From now on, every upload hangs (listings and reads still work).
        proxy.stall_next(10**6, match=b"PUT ")
        before = complete_on(url)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - signalled
    proxy.heal()
    assert proc.returncode == 143, err[-3000:]
    # Far below the ~2 min the stalled uploads' timeouts and retries take.
    assert elapsed < grace + 20, elapsed
    (line,) = [l for l in err.splitlines() if "budget ran out" in l]
    match = re.search(r"not on the mirror \S+: (ckpt-\d+) \(committed "
                      r"locally; not uploaded: (\S+\.data-\S+),", line)
    assert match, line
    preempted = match.group(1)
    assert f"keras-ckpt push {local} {url}" in line
    assert before and preempted not in before
    # What was committed on the mirror before the signal is intact.
    mirror = get_uploader(url, **FAST)
    assert complete_on(url) == before
    for name in before:
        mirror.download_checkpoint(name, str(tmp_path / "check"), verify=True)
    # The preemption checkpoint is committed locally: the push completes it.
    assert preempted in local_complete(local)
    mirror.push(str(local))
    assert mirror.latest_complete() == preempted


# --- end-of-fit progress ----------------------------------------------------


def fit_through_slow_link(file_url, tmp_path, monkeypatch, seconds,
                          **kwargs):
    """One short fit whose final checkpoint takes `seconds` to upload."""
    monkeypatch.setattr(SlowLink, "seconds", seconds)
    x, y = data(16)
    mirror = SlowLink(file_url, options=keras_ckpt.store.UploaderOptions(
        **FAST))
    ckpt = fit_through_slow_link.last = keras_ckpt.Checkpoint(
        directory=str(tmp_path / "local"), mirror=mirror, on_preemption=None,
        **kwargs)
    make_model().fit(x, y, batch_size=8, epochs=1, verbose=0,
                     callbacks=[ckpt])
    return ckpt


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_long_end_of_fit_flush_says_what_it_waits_for(
        file_url, tmp_path, monkeypatch, tty):
    from keras_ckpt.engine import checkpoint_manager as checkpoint_lib

    monkeypatch.setattr(checkpoint_lib, "FLUSH_QUIET_SECONDS", 0.5)
    monkeypatch.setattr(checkpoint_lib, "FLUSH_PROGRESS_EVERY", 1.0)
    out = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    start = time.monotonic()
    fit_through_slow_link(file_url, tmp_path, monkeypatch, 3.0, verbose=1)
    waited = time.monotonic() - start
    text = out.getvalue()
    assert f"waiting for pending saves: uploading ckpt-2 to {file_url}" in text
    assert re.search(r"of \S+ \S+ left, [1-3] files", text)
    if tty:
        # One line rewritten in place, ended once.
        waiting = [l for l in text.split("\n") if "waiting for" in l]
        assert len(waiting) == 1 and waiting[0].count("\r") >= 2
    else:
        waiting = [l for l in text.splitlines() if "waiting for" in l]
        # Every second here (10 s by default), not at every poll (0.25 s).
        assert 2 <= len(waiting) <= waited + 1
    assert complete_on(file_url) == ["ckpt-2"]


def test_quiet_flush_prints_nothing(file_url, tmp_path, monkeypatch, capsys):
    from keras_ckpt.engine import checkpoint_manager as checkpoint_lib

    monkeypatch.setattr(checkpoint_lib, "FLUSH_QUIET_SECONDS", 0.1)
    fit_through_slow_link(file_url, tmp_path, monkeypatch, 1.0, verbose=0)
    assert "waiting for" not in capsys.readouterr().out


def test_flush_timeout_still_raises(file_url, tmp_path, monkeypatch):
    with pytest.raises(keras_ckpt.errors.CheckpointWriteError,
                       match="after 0.5 s"):
        fit_through_slow_link(file_url, tmp_path, monkeypatch, 5.0,
                              verbose=0, flush_timeout=0.5)
    ckpt = fit_through_slow_link.last
    ckpt.wait_until_finished()
    assert complete_on(file_url) == ["ckpt-2"]

