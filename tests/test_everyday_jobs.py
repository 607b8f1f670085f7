"""Everyday Keras jobs, killed at a random batch and resumed, end bitwise
identical to an uninterrupted run.

Each job of tests/scripts/everyday.py runs three times in real subprocesses:
uninterrupted; SIGKILLed once the global step reaches a random K (from
KERAS_CKPT_TEST_SEED, printed on failure) after a checkpoint committed; then
the same command again, which resumes. Compared bit for bit: every variable
(model and every optimizer), the History, and what user callbacks recorded
(a batch counter advanced by a callback outside `state=`, the CSVLogger file,
the TensorBoard scalars with their step numbers).
"""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "everyday.py")
SEED = int(os.environ.get("KERAS_CKPT_TEST_SEED", random.randrange(1 << 30)))
JOBS = ("numpy", "augment", "mixed", "adamw", "loggers", "pydataset",
        "reshuffle", "repeat", "gan", "generator", "subclassed", "no_input",
        "gan_lazy")
TOTAL_STEPS = 3 * 6  # EPOCHS * BATCHES in everyday.py ("repeat": 3 * 4)


def run(args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                          text=True, timeout=300)


def load(out):
    arrays = np.load(out)
    with open(out + ".json") as f:
        return {k: arrays[k] for k in arrays.files}, json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_job_killed_and_resumed_is_bitwise_exact(tmp_path, job):
    last = 3 * 4 if job == "repeat" else TOTAL_STEPS
    # After epoch 0, where what carries across epochs (reshuffles, a
    # repeat()ed iterator, Python's RNG) matters.
    kill_at = random.Random(f"{SEED}-{job}").randint(7, last - 2)
    context = f"{job}: SIGKILL at step {kill_at} (KERAS_CKPT_TEST_SEED={SEED})"
    ref = run(["--job", job, "--dir", str(tmp_path / "ref"),
               "--out", str(tmp_path / "ref.npz")])
    assert ref.returncode == 0, f"{context}\n{ref.stderr[-3000:]}"

    args = ["--job", job, "--dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "run.npz")]
    first = run([*args, "--kill-at-step", str(kill_at)])
    assert first.returncode == -signal.SIGKILL, (
        f"{context}: not killed\n{first.stderr[-3000:]}")
    second = run(args)
    assert second.returncode == 0, f"{context}\n{second.stderr[-3000:]}"
    assert "keras_ckpt: resumed from" in second.stdout, context
    # Only a generator's order cannot be checked: that resume says so.
    warned = "cannot guarantee an exact resume" in second.stderr
    assert warned == (job == "generator"), f"{context}: {second.stderr[-2000:]}"

    ref_arrays, ref_meta = load(str(tmp_path / "ref.npz"))
    got_arrays, got_meta = load(str(tmp_path / "run.npz"))
    assert ref_arrays.keys() == got_arrays.keys(), context
    different = [k for k in ref_arrays
                 if not np.array_equal(ref_arrays[k], got_arrays[k])]
    assert not different, f"{context}: variables differ: {different}"
    for key in ref_meta:
        assert got_meta[key] == ref_meta[key], f"{context}: {key} differs"
