"""Checkpointing under tf.distribute, with real processes.

- `MirroredStrategy` (Keras 3, two logical CPU devices in one process):
  killed with SIGKILL at a random batch and resumed, training ends bitwise
  identical to an uninterrupted run; the SavedModel export matches.
- `MultiWorkerMirroredStrategy` (tf_keras, `TF_USE_LEGACY_KERAS=1`): two or
  three worker processes on free loopback ports with `TF_CONFIG`. The job is
  killed mid-epoch (SIGKILL to every worker at once) and started again; every
  worker resumes from the chief's checkpoint, directly or through a file://
  mirror, and the final weights equal those of an uninterrupted job. Only
  the chief writes: the other workers' directories stay empty, the mirror
  holds the chief's checkpoints only, and no worker leaves a temporary
  directory behind. A SIGTERM on one non-chief worker stops every worker at
  the same batch after one checkpoint by the chief.
"""

import functools
import json
import os
import re
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts",
                      "train_distributed.py")
SEED = int(os.environ.get("KERAS_CKPT_TEST_SEED", random.randrange(1 << 30)))
TIMEOUT = 240


def _quiet_env(**extra):
    env = dict(os.environ)
    for key in ("TF_CONFIG", "KERAS_CKPT_MIRROR", "KERAS_CKPT_DIR",
                "TF_USE_LEGACY_KERAS"):
        env.pop(key, None)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(text, n=3000):
    lines = [line for line in text.splitlines()
             if not line.startswith(("I0000", "W0000", "WARNING: All log"))]
    return "\n".join(lines)[-n:]


def run_job(tmp_path, workers, args, *, dirs=None, expect=0, label="job"):
    """Runs one multi-worker job to its end; returns each worker's output.

    All workers share a new process group (so a worker can kill the whole
    job at once) and a private TMPDIR (to find stray temporary directories).
    `dirs[i]` is worker i's checkpoint directory (default: one shared).
    """
    ports = _free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    procs, logs = [], []
    for i in range(workers):
        env = _quiet_env(
            TF_USE_LEGACY_KERAS="1", TMPDIR=str(tmpdir),
            TF_CONFIG=json.dumps({"cluster": cluster,
                                  "task": {"type": "worker", "index": i}}))
        log = open(tmp_path / f"{label}.{i}.log", "w+")
        directory = dirs[i] if dirs else str(tmp_path / "ckpt")
        procs.append(subprocess.Popen(
            [sys.executable, SCRIPT, "--strategy", "multiworker",
             "--dir", directory, *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            # Python 3.10 has no `process_group=`.
            preexec_fn=functools.partial(os.setpgid, 0,
                                         procs[0].pid if procs else 0)))
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic()))
                 for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    expected = expect if isinstance(expect, (list, tuple)) else [expect] * workers
    assert codes == list(expected), (
        f"{label}: exit codes {codes}, expected {expected}\n"
        + "\n".join(f"--- worker {i}:\n{_tail(o)}" for i, o in enumerate(outputs)))
    return outputs


def load(out, worker=0):
    arrays = np.load(f"{out}.{worker}.npz")
    with open(f"{out}.{worker}.json") as f:
        return {k: arrays[k] for k in arrays.files}, json.load(f)


def assert_same_weights(reference, resumed, workers, context):
    ref, _ = load(reference)
    for worker in range(workers):
        got, _ = load(resumed, worker)
        assert ref.keys() == got.keys()
        different = [k for k in ref if not np.array_equal(ref[k], got[k])]
        assert not different, (
            f"{context}: worker {worker}'s variables differ: {different}")


def assert_nothing_written_by_workers(tmp_path, dirs):
    for directory in dirs[1:]:
        assert not os.path.exists(directory) or not os.listdir(directory), (
            f"a non-chief worker wrote to {directory}: {os.listdir(directory)}")
    assert stray_temp_dirs(tmp_path) == []


def stray_temp_dirs(tmp_path):
    """keras_ckpt's temporary directories left in the workers' TMPDIR
    (TensorFlow's autograph leaves its own files there)."""
    return [name for name in os.listdir(tmp_path / "tmp")
            if name.startswith("keras_ckpt")]


def assert_only_chief_uploaded(log):
    writers = {}
    for line in log.read_text().splitlines():
        worker, what, name = line.split()
        writers.setdefault(int(worker), []).append(f"{what} {name}")
    assert list(writers) == [0], f"workers other than the chief wrote to " \
        f"the mirror: { {w: v[:5] for w, v in writers.items() if w} }"
    assert any(op.startswith("upload ckpt-") for op in writers[0])


def checkpoint_names(directory):
    """Committed checkpoints (with a manifest), oldest first."""
    return sorted((p.removesuffix(".json") for p in os.listdir(directory)
                   if p.startswith("ckpt-") and p.endswith(".json")),
                  key=lambda name: int(name.split("-")[1]))


# ---------------------------------------------------------------------------
# MirroredStrategy, Keras 3.
# ---------------------------------------------------------------------------


def run_single(args, check=True, strategy="mirrored", **env):
    """One process: `MirroredStrategy` (Keras 3), or no strategy."""
    result = subprocess.run(
        [sys.executable, SCRIPT, "--strategy", strategy, *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=_quiet_env(**env))
    if check and result.returncode != 0:
        raise AssertionError(
            f"train_distributed.py {' '.join(args)} exited "
            f"{result.returncode}:\n{_tail(result.stdout + result.stderr)}")
    return result


@pytest.mark.slow
def test_mirrored_sigkill_and_resume_is_bitwise_exact(tmp_path):
    kill_at = random.Random(f"{SEED}-mirrored").randint(9, 26)
    context = f"MirroredStrategy, SIGKILL after step {kill_at} " \
              f"(KERAS_CKPT_TEST_SEED={SEED})"
    args = ["--save-freq", "4"]
    reference = str(tmp_path / "reference")
    run_single(["--dir", str(tmp_path / "ref-ckpt"), "--out", reference,
                  "--export", str(tmp_path / "ref-export"), *args])
    resumed = str(tmp_path / "resumed")
    directory = str(tmp_path / "ckpt")
    first = run_single(["--dir", directory, "--out", resumed,
                          "--kill-at-step", str(kill_at), *args], check=False)
    assert first.returncode == -signal.SIGKILL, _tail(first.stderr)
    second = run_single(["--dir", directory, "--out", resumed, "--export",
                           str(tmp_path / "export"), *args])
    assert "keras_ckpt: resumed from" in second.stdout, second.stdout

    ref_arrays, ref_meta = load(reference)
    got_arrays, got_meta = load(resumed)
    different = [k for k in ref_arrays
                 if not np.array_equal(ref_arrays[k], got_arrays[k])]
    assert not different, f"{context}: variables differ: {different}"
    assert got_meta["history"] == ref_meta["history"], context
    assert got_meta["epochs"] == ref_meta["epochs"]
    assert got_meta["export_matches"] and ref_meta["export_matches"]


_REPLICA_METRICS = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_ckpt.engine import state as state_lib
from keras_ckpt import _keras_compat as compat
keras.utils.set_random_seed(0)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
x = np.random.RandomState(1).rand(16, 3).astype("float32")
model.fit(x, x[:, :1] * 3.3, batch_size=16, epochs=1, verbose=0)
training = state_lib.TrainingState(model)
snap = training.snapshot()
arrays = {g: [np.asarray(t) for t in ts] for g, ts in snap.tensors.items()}
copies = [c for v in model.metrics_variables
          for c in (compat.replica_components(v) or [])]
saved = [np.asarray(c) for c in copies]
for v in model.metrics_variables:
    v.assign(tf.zeros_like(v))
assert training.assign_metrics(snap.specs, arrays)
print(len(snap.specs["metrics/replicas"]), len(copies),
      all(np.array_equal(np.asarray(c), s) for c, s in zip(copies, saved)),
      any(not np.array_equal(saved[i], saved[i + 1])
          for i in range(0, len(saved), 2)))
"""


@pytest.mark.slow
def test_running_metrics_restore_each_replica_copy_bit_for_bit():
    """A sync-on-read accumulator read sums its copies and an assignment
    splits the sum evenly: the checkpoint keeps each copy and a resume on as
    many replicas puts each back as it was (the 7th-digit History drift)."""
    result = subprocess.run([sys.executable, "-c", _REPLICA_METRICS],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env=_quiet_env())
    saved, live, exact, uneven = result.stdout.split()[-4:]
    assert saved == live and int(saved) > 0, _tail(result.stderr)
    assert exact == "True"
    assert uneven == "True"  # the copies differ: an even split would not do


@pytest.mark.slow
@pytest.mark.parametrize("written_on,resumed_on", [(2, 1), (1, 2)])
def test_mirrored_checkpoint_resumes_on_another_number_of_devices(
        tmp_path, written_on, resumed_on):
    """Same global batch on 2 devices and on 1: the checkpoint restores and
    training continues from the same batch, and the run warns that it cannot
    be bitwise identical (per-replica Dropout masks and gradient sums)."""
    args = ["--save-freq", "4"]
    reference = str(tmp_path / "reference")
    run_single(["--dir", str(tmp_path / "ref-ckpt"), "--out", reference,
                "--replicas", str(written_on), *args])
    directory, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    first = run_single(["--dir", directory, "--out", resumed, "--kill-at-step",
                        "14", "--replicas", str(written_on), *args],
                       check=False)
    assert first.returncode == -signal.SIGKILL, _tail(first.stderr)
    second = run_single(["--dir", directory, "--out", resumed, "--replicas",
                         str(resumed_on), *args])
    assert "(skipping the" in second.stdout, second.stdout  # mid-epoch
    assert "another number of local replicas" in second.stderr, (
        _tail(second.stderr))
    ref_arrays, ref_meta = load(reference)
    got_arrays, got_meta = load(resumed)
    # The position continued (the step counters end equal, every epoch is
    # in the History) and the epochs finished before the checkpoint are the
    # written run's, bit for bit. The rest differs beyond rounding: each
    # replica draws Dropout masks for its own shard of the batch.
    counters = [k for k in ref_arrays if ref_arrays[k].dtype.kind in "iu"]
    assert counters and all(
        np.array_equal(ref_arrays[k], got_arrays[k]) for k in counters)
    assert got_meta["epochs"] == ref_meta["epochs"]
    # "resumed from ...: step S, epoch E/N, batch B" (Keras' 1-based epoch
    # E, in progress) or "..., end of epoch E/N" (E epochs finished).
    match = re.search(r"resumed from .*?: step \d+, (end of )?epoch (\d+)",
                      second.stdout)
    resumed_epoch = int(match.group(2)) - (0 if match.group(1) else 1)
    for key, values in ref_meta["history"].items():
        assert got_meta["history"][key][:resumed_epoch] == (
            values[:resumed_epoch]), key


@pytest.mark.slow
# 17 resumes mid-epoch; 25 resumes at the epoch boundary right after
# ReduceLROnPlateau halved the LR (tf_keras keeps the LR variable outside
# `optimizer.variables`: it must still be saved).
@pytest.mark.parametrize("kill_at", [17, 25])
def test_tf_keras_resume_restores_weights_and_callback_state(tmp_path, kill_at):
    """tf_keras without a strategy, with a ReduceLROnPlateau in `state=`."""
    context = f"tf_keras, SIGKILL after step {kill_at} " \
              f"(KERAS_CKPT_TEST_SEED={SEED})"
    args = ["--save-freq", "4", "--plateau"]
    legacy = {"strategy": "none", "TF_USE_LEGACY_KERAS": "1"}
    reference = str(tmp_path / "reference")
    run_single(["--dir", str(tmp_path / "ref-ckpt"), "--out", reference,
                *args], **legacy)
    resumed = str(tmp_path / "resumed")
    directory = str(tmp_path / "ckpt")
    first = run_single(["--dir", directory, "--out", resumed, "--kill-at-step",
                        str(kill_at), *args], check=False, **legacy)
    assert first.returncode == -signal.SIGKILL, _tail(first.stderr)
    second = run_single(["--dir", directory, "--out", resumed, *args],
                        **legacy)
    assert "keras_ckpt: resumed from" in second.stdout, second.stdout

    ref_arrays, ref_meta = load(reference)
    got_arrays, got_meta = load(resumed)
    different = [k for k in ref_arrays
                 if not np.array_equal(ref_arrays[k], got_arrays[k])]
    assert not different, f"{context}: variables differ: {different}"
    assert got_meta["lr"] == ref_meta["lr"] < 0.05, context
    assert got_meta["plateau"] == ref_meta["plateau"], context
    # tf_keras' running metrics are not restored: only the validation
    # metrics of the interrupted epoch are exact (see docs/distributed.md).
    for key in ("val_loss", "val_accuracy", "lr"):
        assert got_meta["history"][key] == ref_meta["history"][key], key


# ---------------------------------------------------------------------------
# MultiWorkerMirroredStrategy, tf_keras.
# ---------------------------------------------------------------------------

MW_ARGS = ["--save-freq", "4", "--epochs", "3", "--batches", "10"]


@pytest.fixture(scope="module")
def mw_reference(tmp_path_factory):
    """Uninterrupted 2-worker job: (out prefix, its outputs)."""
    tmp_path = tmp_path_factory.mktemp("mw-reference")
    out = str(tmp_path / "reference")
    outputs = run_job(tmp_path, 2, ["--out", out, *MW_ARGS], label="reference")
    ref0, meta0 = load(out, 0)
    ref1, _ = load(out, 1)
    assert all(np.array_equal(ref0[k], ref1[k]) for k in ref0), (
        "the workers of one job ended with different weights")
    assert meta0["last_saved"] == "ckpt-30"
    return out, outputs


def _kill_step(name):
    # Mid-epoch (10 batches per epoch), after at least one checkpoint.
    step = random.Random(f"{SEED}-{name}").choice(
        [s for s in range(6, 27) if s % 10 not in (0, 9)])
    return step


@pytest.mark.slow
def test_multiworker_sigkill_resumes_from_chiefs_checkpoint(tmp_path,
                                                            mw_reference):
    reference, _ = mw_reference
    kill_at = _kill_step("shared")
    context = f"2 workers, shared directory, SIGKILL after step {kill_at} " \
              f"(KERAS_CKPT_TEST_SEED={SEED})"
    out = str(tmp_path / "resumed")
    args = ["--out", out, *MW_ARGS]
    run_job(tmp_path, 2, [*args, "--kill-at-step", str(kill_at)],
            expect=-signal.SIGKILL, label="killed")
    saved = checkpoint_names(tmp_path / "ckpt")
    assert saved, "the chief committed no checkpoint before the kill"
    outputs = run_job(tmp_path, 2, args, label="resumed")
    step = int(saved[-1].split("-")[1])
    assert f"resumed from {tmp_path / 'ckpt'}: step {step}," in outputs[0]
    assert f"resumed from {tmp_path / 'ckpt'}/{saved[-1]}: step {step}," \
        in outputs[1], _tail(outputs[1])
    assert_same_weights(reference, out, 2, context)
    _, meta = load(out, 1)
    assert meta["last_saved"] is None  # worker 1 never wrote a checkpoint
    assert stray_temp_dirs(tmp_path) == []


@pytest.mark.slow
def test_multiworker_resume_through_file_mirror_on_fresh_machines(tmp_path,
                                                                  mw_reference):
    """Each worker has its own (emptied) disk; they all read the mirror."""
    reference, _ = mw_reference
    kill_at = _kill_step("mirror")
    context = f"2 workers, file:// mirror, SIGKILL after step {kill_at} " \
              f"(KERAS_CKPT_TEST_SEED={SEED})"
    mirror = tmp_path / "mirror"
    dirs = [str(tmp_path / f"disk{i}" / "ckpt") for i in range(2)]
    out = str(tmp_path / "resumed")
    uploads = tmp_path / "uploads.log"
    args = ["--out", out, "--mirror", f"file://{mirror}", *MW_ARGS,
            "--spy-uploads", str(uploads),
            "--sync"]  # every committed checkpoint is in the mirror
    run_job(tmp_path, 2, [*args, "--kill-at-step", str(kill_at)], dirs=dirs,
            expect=-signal.SIGKILL, label="killed")
    assert_nothing_written_by_workers(tmp_path, dirs)
    mirrored = checkpoint_names(mirror)
    assert mirrored and mirrored == checkpoint_names(dirs[0])
    for directory in dirs:  # fresh machines: empty local disks
        if os.path.exists(directory):
            for name in os.listdir(directory):
                os.remove(os.path.join(directory, name))

    outputs = run_job(tmp_path, 2, args, dirs=dirs, label="resumed")
    for output in outputs:
        assert f"keras_ckpt: resumed from file://{mirror}/{mirrored[-1]}" \
            in output, _tail(output)
    assert_same_weights(reference, out, 2, context)
    assert_nothing_written_by_workers(tmp_path, dirs)
    # Only the chief's uploads: the mirror holds exactly its checkpoints.
    assert_only_chief_uploaded(uploads)
    assert checkpoint_names(mirror) == checkpoint_names(dirs[0])
    assert sorted(n for n in os.listdir(mirror) if not n.startswith(".")) == (
        sorted(n for n in os.listdir(dirs[0]) if not n.startswith(".")))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["worker1", "all"])
def test_multiworker_sigterm_saves_once_for_all(tmp_path, mw_reference, target):
    """SIGTERM on one non-chief worker, or on every worker at once."""
    reference, _ = mw_reference
    dirs = [str(tmp_path / f"disk{i}" / "ckpt") for i in range(2)]
    mirror = tmp_path / "mirror"
    out = str(tmp_path / "resumed")
    args = ["--out", out, "--mirror", f"file://{mirror}", *MW_ARGS]
    outputs = run_job(tmp_path, 2, [*args, "--sigterm-at-step", "13",
                                    "--sigterm-worker",
                                    "1" if target == "worker1" else "-1"],
                      dirs=dirs, expect=143, label="preempted")
    # SIGTERM after step 13; every worker stopped after step 14, where the
    # chief committed and mirrored one checkpoint.
    if target == "worker1":
        assert "preemption notice (SIGTERM)" in outputs[1], _tail(outputs[1])
        assert "preemption notice (preemption of worker:1)" in outputs[0], \
            _tail(outputs[0])
    else:
        # All signalled at once: a worker may learn of a peer's notice
        # before its own SIGTERM is handled; either way one notice each,
        # and at least one of them is a SIGTERM.
        for output in outputs:
            assert output.count("preemption notice (") == 1, _tail(output)
        assert any("preemption notice (SIGTERM)" in o for o in outputs), \
            [_tail(o) for o in outputs]
    for output in outputs:
        assert "saving at epoch 2/3, batch 4" in output, _tail(output)
    assert checkpoint_names(mirror)[-1] == "ckpt-14"
    assert checkpoint_names(dirs[0])[-1] == "ckpt-14"
    assert_nothing_written_by_workers(tmp_path, dirs)

    outputs = run_job(tmp_path, 2, args, dirs=dirs, label="resumed")
    for output in outputs:
        assert "step 14, epoch 2/3, batch 4" in output, _tail(output)
    assert_same_weights(reference, out, 2, f"SIGTERM on {target} at step 13")


@pytest.mark.slow
def test_three_workers_sigkill_and_resume(tmp_path):
    """Three workers, each with its own disk, through a file:// mirror whose
    newest checkpoint lost its manifest."""
    reference = str(tmp_path / "reference")
    args = ["--save-freq", "4", "--epochs", "2", "--batches", "10", "--sync"]
    mirror = tmp_path / "ref-mirror"
    run_job(tmp_path, 3, ["--out", reference, "--mirror", f"file://{mirror}",
                          *args],
            dirs=[str(tmp_path / f"ref{i}") for i in range(3)],
            label="reference")
    kill_at = random.Random(f"{SEED}-three").choice([6, 7, 11, 13, 15])
    mirror = tmp_path / "mirror"
    dirs = [str(tmp_path / f"disk{i}" / "ckpt") for i in range(3)]
    out = str(tmp_path / "resumed")
    uploads = tmp_path / "uploads.log"
    run_args = ["--out", out, "--mirror", f"file://{mirror}",
                "--spy-uploads", str(uploads), *args]
    run_job(tmp_path, 3, [*run_args, "--kill-at-step", str(kill_at)],
            dirs=dirs, expect=-signal.SIGKILL, label="killed")
    newest = checkpoint_names(dirs[0])[-1]
    assert checkpoint_names(mirror)[-1] == newest
    # As if the kill had cut the newest upload short: the chief resumes from
    # its own disk and completes the upload before the workers read the
    # mirror.
    os.remove(mirror / f"{newest}.json")
    outputs = run_job(tmp_path, 3, run_args, dirs=dirs, label="resumed")
    assert f"resumed from {dirs[0]}: step" in outputs[0], _tail(outputs[0])
    for output in outputs[1:]:
        assert f"resumed from file://{mirror}/{newest}" in output, \
            _tail(output)
    assert_same_weights(reference, out, 3,
                        f"3 workers, SIGKILL after step {kill_at} "
                        f"(KERAS_CKPT_TEST_SEED={SEED})")
    assert_nothing_written_by_workers(tmp_path, dirs)
    assert_only_chief_uploaded(uploads)
