"""End to end, in real subprocesses against the emulated clouds.

- A job is killed mid-epoch, its VM's disk is wiped, and the same command
  resumes from the mirror (file, S3, GCS, Azure) bitwise exactly.
- A checkpoint half-uploaded when the job was killed is never resumed from.
- SIGTERM (preemption) mid-epoch on SageMaker, Vertex AI, Azure ML and
  locally: exit
  143, no export; the restart resumes exactly, finishes and exports in the
  platform's layout; the export serves what the model computes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import keras_ckpt
from keras_ckpt import manifest as manifest_lib

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train.py")
ARGS = ["--save-freq", "5", "--lr", "plateau"]

pytestmark = pytest.mark.slow


def run(args, env, check=True, timeout=300):
    result = subprocess.run([sys.executable, SCRIPT, *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}")
    return result


def load(out):
    arrays = np.load(out)
    with open(out + ".json") as f:
        return [arrays[k] for k in sorted(arrays.files)], json.load(f)


def assert_same(reference, got):
    ref_arrays, ref_meta = load(reference)
    got_arrays, got_meta = load(got)
    assert len(ref_arrays) == len(got_arrays)
    for a, b in zip(ref_arrays, got_arrays):
        np.testing.assert_array_equal(a, b)
    assert ref_meta["history"] == got_meta["history"]
    assert ref_meta["lr"] == got_meta["lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that every resumed run must equal."""
    root = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run(["--dir", str(root / "ckpts"), "--out", str(root / "out.npz"), *ARGS],
        env)
    return str(root / "out.npz")


def test_resume_on_a_fresh_machine_from_each_mirror(
        tmp_path, mirror_url, subprocess_env, reference):
    env = subprocess_env()
    local = tmp_path / "vm-disk"
    out = str(tmp_path / "out.npz")
    job = ["--dir", str(local), "--mirror", mirror_url, "--out", out, *ARGS]
    first = run(job + ["--kill-at-step", "31"], env, check=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    mirrored = [i for i in keras_ckpt.list_checkpoints(mirror_url) if i.complete]
    assert mirrored, "nothing reached the mirror before the kill"

    shutil.rmtree(local)  # the VM and its disk are gone
    second = run(job, env)
    assert f"resumed from {mirror_url}/ckpt-" in second.stdout, second.stdout
    assert_same(reference, out)
    final = keras_ckpt.list_checkpoints(mirror_url)
    assert final[-1].step == 48 and final[-1].complete
    assert len([i for i in final if i.complete]) <= 3  # retention: 2 + best


def test_a_partial_upload_is_never_resumed_from(tmp_path, s3_url,
                                                subprocess_env, reference):
    env = subprocess_env()
    job = ["--dir", str(tmp_path / "vm"), "--mirror", s3_url,
           "--out", str(tmp_path / "out.npz"), *ARGS]
    run(job + ["--kill-at-step", "31"], env, check=False)
    uploader = keras_ckpt.get_uploader(s3_url)
    complete = [i for i in uploader.list_checkpoints() if i.complete]
    latest = complete[-1]
    # Simulate a process killed half-way through mirroring the next
    # checkpoint: its data is there, its index is not, the manifest is.
    manifest = uploader.read_manifest(latest.name)
    fake = manifest_lib.Manifest(**{**manifest.__dict__,
                                    "name": "ckpt-999", "step": 999,
                                    "files": {
                                        "ckpt-999.data-00000-of-00001": {
                                            "size": 10, "crc32c": "0" * 8},
                                        "ckpt-999.index": {
                                            "size": 10, "crc32c": "0" * 8}}})
    uploader.write_bytes("ckpt-999.data-00000-of-00001", b"x" * 10)
    uploader.write_bytes("ckpt-999.json", fake.to_json().encode())
    listed = {i.name: i.complete for i in uploader.list_checkpoints()}
    assert listed["ckpt-999"] is False

    shutil.rmtree(tmp_path / "vm")
    second = run(job, env)
    assert f"resumed from {s3_url}/{latest.name}: step {latest.step}," in second.stdout
    assert_same(reference, str(tmp_path / "out.npz"))


@pytest.mark.parametrize("proxied_mirror", ["s3"], indirect=True)
def test_sigkill_during_an_upload_leaves_the_mirror_consistent(
        tmp_path, proxied_mirror, subprocess_env, reference):
    env = subprocess_env()
    local = tmp_path / "vm"
    out = str(tmp_path / "out.npz")
    job = ["--dir", str(local), "--mirror", proxied_mirror.url, "--out", out,
           *ARGS]
    process = subprocess.Popen([sys.executable, SCRIPT, *job,
                                "--batch-sleep", "0.05"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(local.glob("ckpt-*.json"))) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proxy = proxied_mirror.proxy
        proxy.fail_after(30_000)  # the network dies in the middle of a file
        time.sleep(1.5)
    finally:
        process.kill()
        process.communicate()
    proxy.heal()

    uploader = keras_ckpt.get_uploader(proxied_mirror.url)
    latest, _ = manifest_lib.parse_pointer(
        uploader.read_bytes(manifest_lib.POINTER_NAME).decode())
    listed = {i.name: i for i in uploader.list_checkpoints()}
    assert listed[latest].complete, "the pointer names an incomplete checkpoint"

    shutil.rmtree(local)
    second = run(job, env)
    assert "resumed from" in second.stdout
    assert_same(reference, out)


# ---------------------------------------------------------------------------
# Platforms: SIGTERM -> exit 143, no export; restart -> exact, export
# ---------------------------------------------------------------------------

def _load_export(path):
    served = tf.saved_model.load(path)
    signature = served.signatures["serving_default"]
    x = tf.constant(np.random.RandomState(0).rand(4, 8).astype("float32"))
    (name,) = signature.structured_input_signature[1]
    return next(iter(signature(**{name: x}).values())).numpy()


@pytest.mark.parametrize("platform", ["local", "sagemaker", "vertex", "azureml"])
def test_preemption_and_export_on_each_platform(
        tmp_path, platform, gcs_url, subprocess_env, reference):
    out = str(tmp_path / "out.npz")
    extra = {}
    if platform == "local":
        workdir = tmp_path / "job"
        workdir.mkdir()
        export = workdir / "export" / "1"
    elif platform == "azureml":
        workdir = tmp_path / "job"
        workdir.mkdir()
        extra = dict(AZUREML_RUN_ID="keras-ckpt-test-run")
        export = workdir / "outputs" / "model" / "1"
    elif platform == "sagemaker":
        workdir = tmp_path
        extra = dict(SM_MODEL_DIR=str(tmp_path / "model"),
                     KERAS_CKPT_DIR=str(tmp_path / "opt-ml-checkpoints"))
        export = tmp_path / "model" / "1"
    else:
        workdir = tmp_path
        extra = dict(AIP_MODEL_DIR=f"{gcs_url}/model",
                     AIP_CHECKPOINT_DIR=f"{gcs_url}/checkpoints",
                     CLOUD_ML_JOB_ID=f"job-{os.getpid()}-{time.time_ns()}")
        export = None
    env = subprocess_env(**extra)
    job = ["--preset", "--out", out, *ARGS]

    def call(args):
        return subprocess.run([sys.executable, SCRIPT, *args], env=env,
                              cwd=workdir, capture_output=True, text=True,
                              timeout=300)

    first = call(job + ["--sigterm-at-step", "29"])
    assert first.returncode == 143, first.stdout[-2000:] + first.stderr[-2000:]
    assert "preemption notice (SIGTERM)" in first.stdout
    assert not os.path.exists(out)
    if export is not None:
        assert not export.exists(), "a preempted run must not export"

    second = call(job)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout and "step 29" in second.stdout
    assert_same(reference, out)

    if platform == "vertex":
        export = tmp_path / "downloaded"
        uploader = keras_ckpt.get_uploader(f"{gcs_url}/model")
        names = uploader.list_files()
        assert "saved_model.pb" in names  # at the root, no version dir
        for name in names:
            target = export / name
            target.parent.mkdir(parents=True, exist_ok=True)
            uploader.download_file(name, str(target))
        checkpoints = keras_ckpt.list_checkpoints(f"{gcs_url}/checkpoints")
        assert checkpoints[-1].step == 48
    assert (export / "saved_model.pb").exists()
    _, meta = load(out)
    np.testing.assert_allclose(_load_export(str(export)), meta["predictions"],
                               rtol=1e-5, atol=1e-6)
