"""The Checkpoint callback with mirrors and preemption, in-process.

- A missing bucket is reported before the first batch trains; nothing local
  is touched.
- A mirror that keeps failing surfaces on the training thread with the URL
  and the cause; the local checkpoints stay.
- on_preemption="stop": SIGTERM (or a cloud preemption notice served by a
  local metadata server) saves at the next batch, flushes, ends fit, and
  ExportSavedModel does not export.
"""

import http.server
import os
import signal
import threading

import keras
import numpy as np
import pytest

import keras_ckpt
from test_checkpoint import ckpt_args, dir_state, fit, make_model


class SendSignal(keras.callbacks.Callback):
    def __init__(self, at_batch, sig=signal.SIGTERM):
        super().__init__()
        self.at_batch, self.sig = at_batch, sig

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at_batch:
            os.kill(os.getpid(), self.sig)


def test_missing_bucket_fails_before_the_first_batch(tmp_path, s3_url):
    bucket = s3_url.split("/")[2]
    missing = s3_url.replace(bucket, bucket + "-missing")
    local = tmp_path / "ckpts"
    fit(make_model(), keras_ckpt.Checkpoint(directory=local, **ckpt_args()),
        epochs=1)
    before = dir_state(local)
    model = make_model()
    with pytest.raises(keras_ckpt.StorageError, match=bucket + "-missing"):
        fit(model, keras_ckpt.Checkpoint(directory=local, mirror=missing,
                                         **ckpt_args()), epochs=1)
    assert int(model.optimizer.iterations.numpy()) == 0  # nothing trained
    assert dir_state(local) == before


def test_persistent_mirror_failure_surfaces_with_url_and_cause(
        tmp_path, fault_proxy, moto_server, monkeypatch):
    from conftest import _fresh_url

    proxy = fault_proxy(moto_server.port)
    url = _fresh_url(moto_server, monkeypatch, endpoint=proxy.endpoint)
    local = tmp_path / "ckpts"
    uploader = keras_ckpt.get_uploader(url, retries=1, backoff=0.01,
                                       request_retries=0, timeout=5)

    class BreakNetwork(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                proxy.fail_after(0)  # every later request is reset

    ckpt = keras_ckpt.Checkpoint(directory=local, mirror=uploader,
                                 on_mirror_error="raise",
                                 **ckpt_args(async_save=True))
    with pytest.raises(keras_ckpt.StorageError) as error:
        fit(make_model(), ckpt, epochs=3, extra=[BreakNetwork()])
    assert url in str(error.value)
    assert "reset" in str(error.value).lower() or "connection" in str(
        error.value).lower()
    proxy.heal()
    local_steps = [i.step for i in keras_ckpt.list_checkpoints(local)]
    assert 6 in local_steps  # the epoch-1 checkpoint, committed locally
    mirrored = [i.step for i in keras_ckpt.list_checkpoints(url) if i.complete]
    assert mirrored == [6] or mirrored == []


def test_sigterm_with_stop_saves_and_ends_fit_without_export(tmp_path):
    export_dir = tmp_path / "export"
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path / "ckpts", verbose=0,
                                 on_preemption="stop", save_freq=100)
    export = keras_ckpt.ExportSavedModel(export_dir, layout="plain",
                                         verbose=0)
    previous = signal.getsignal(signal.SIGTERM)
    model = make_model()
    fit(model, ckpt, epochs=3, extra=[SendSignal(at_batch=2), export])
    assert ckpt.preempted
    assert signal.getsignal(signal.SIGTERM) == previous  # handler removed
    infos = keras_ckpt.list_checkpoints(tmp_path / "ckpts")
    assert [(i.epoch, i.batch) for i in infos] == [(0, 3)]
    assert int(model.optimizer.iterations.numpy()) == 3  # nothing after it
    assert not export_dir.exists()

    resumed = keras_ckpt.Checkpoint(directory=tmp_path / "ckpts", verbose=0,
                                    on_preemption="stop", save_freq=100)
    export2 = keras_ckpt.ExportSavedModel(export_dir, layout="plain",
                                          verbose=0)
    fit(make_model(seed=9), resumed, epochs=3, extra=[export2])
    assert resumed.restored.step == 3 and not resumed.preempted
    assert (export_dir / "1" / "saved_model.pb").exists()


class _GceMetadata(http.server.BaseHTTPRequestHandler):
    preempted = False

    def do_GET(self):
        if self.path.startswith("/computeMetadata/v1/instance/preempted") and (
                self.headers.get("Metadata-Flavor") == "Google"):
            body = b"TRUE" if type(self).preempted else b"FALSE"
            self.send_response(200)
            self.send_header("Metadata-Flavor", "Google")
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def test_gce_preemption_notice_triggers_the_same_save(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GceMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("KERAS_CKPT_GCE_METADATA_URL",
                       f"http://127.0.0.1:{server.server_port}")
    try:
        class Preempt(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 1:
                    _GceMetadata.preempted = True

            def on_train_batch_begin(self, batch, logs=None):
                import time
                time.sleep(0.05)  # give the watcher a few polls per batch

        ckpt = keras_ckpt.Checkpoint(
            directory=tmp_path, verbose=0, on_preemption="stop",
            save_freq=1000, preemption_watch=("gce",),
            preemption_poll_interval=0.05)
        model = make_model()
        fit(model, ckpt, epochs=20, extra=[Preempt()])
        assert ckpt.preempted
        infos = keras_ckpt.list_checkpoints(tmp_path)
        assert len(infos) == 1 and infos[0].step < 20 * 6
        # Nothing trained after the preemption checkpoint.
        assert int(model.optimizer.iterations.numpy()) == infos[0].step
    finally:
        _GceMetadata.preempted = False
        server.shutdown()
