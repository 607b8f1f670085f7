"""Killed-and-resumed training ends bitwise identical to uninterrupted training.

Real subprocesses run tests/scripts/train.py: one uninterrupted, one killed
with SIGKILL at a random batch and then started again with the same command.
The final model and optimizer variables and the History must match exactly.
"""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train.py")
SEED = int(os.environ.get("KERAS_CKPT_TEST_SEED", random.randrange(1 << 30)))

CONFIGS = {
    # Dropout + Adam + ExponentialDecay, saves every 5 batches (async).
    "schedule-batches": ["--save-freq", "5"],
    # A float LR driven by ReduceLROnPlateau passed in state=.
    "plateau-state": ["--save-freq", "4", "--lr", "plateau"],
    "schedule-epoch": ["--save-freq", "epoch"],
    "steps-per-execution": ["--save-freq", "4", "--spe", "2"],
    "sync-early-stopping": ["--save-freq", "7", "--sync", "--early-stopping"],
}


def run(args, env=None, check=True):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True,
        timeout=300, env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def load(out):
    arrays = np.load(out)
    with open(out + ".json") as f:
        return {k: arrays[k] for k in arrays.files}, json.load(f)


def assert_same_training(reference, resumed, context):
    ref_arrays, ref_meta = load(reference)
    got_arrays, got_meta = load(resumed)
    assert ref_arrays.keys() == got_arrays.keys()
    different = [k for k in ref_arrays
                 if not np.array_equal(ref_arrays[k], got_arrays[k])]
    assert not different, f"{context}: variables differ: {different}"
    assert ref_meta == got_meta, f"{context}: history/state differ"


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_sigkill_and_resume_is_bitwise_exact(tmp_path, config):
    args = CONFIGS[config]
    kill_at = random.Random(f"{SEED}-{config}").randint(6, 42)
    context = (f"{config}, SIGKILL after step {kill_at} "
               f"(KERAS_CKPT_TEST_SEED={SEED})")
    run(["--dir", str(tmp_path / "reference"), "--out",
         str(tmp_path / "reference.npz"), *args])

    resumed_dir = str(tmp_path / "resumed")
    out = str(tmp_path / "resumed.npz")
    first = run(["--dir", resumed_dir, "--out", out, "--kill-at-step",
                 str(kill_at), *args], check=False)
    assert first.returncode == -signal.SIGKILL, (
        f"{context}: expected the first run to be killed\n{first.stderr[-2000:]}")
    assert not os.path.exists(out)
    second = run(["--dir", resumed_dir, "--out", out, *args])
    assert "keras_ckpt: resumed from" in second.stdout, second.stdout
    assert_same_training(str(tmp_path / "reference.npz"), out, context)


@pytest.mark.slow
def test_two_kills_in_a_row_still_exact(tmp_path):
    args = ["--save-freq", "3", "--lr", "plateau"]
    run(["--dir", str(tmp_path / "reference"), "--out",
         str(tmp_path / "reference.npz"), *args])
    resumed_dir = str(tmp_path / "resumed")
    out = str(tmp_path / "resumed.npz")
    for kill_at in (10, 29):
        result = run(["--dir", resumed_dir, "--out", out, "--kill-at-step",
                      str(kill_at), *args], check=False)
        assert result.returncode == -signal.SIGKILL
    run(["--dir", resumed_dir, "--out", out, *args])
    assert_same_training(str(tmp_path / "reference.npz"), out, "two kills")


@pytest.mark.slow
def test_sigkill_during_a_background_write(tmp_path):
    """The in-flight checkpoint is lost, the previous one resumes exactly."""
    # ~50 MB of state: several chunks, so the kill lands inside the data file.
    args = ["--save-freq", "5", "--units", "2048", "--hidden", "2048",
            "--epochs", "2"]
    run(["--dir", str(tmp_path / "reference"), "--out",
         str(tmp_path / "reference.npz"), *args])
    resumed_dir = tmp_path / "resumed"
    out = str(tmp_path / "resumed.npz")
    # The writer of the save of step 15 kills the process once it has
    # written the first chunk of that checkpoint's data file (a faster
    # writer finishes within a training step, so a kill timed by steps no
    # longer lands inside the write).
    first = run(["--dir", str(resumed_dir), "--out", out, "--kill-mid-write",
                 "ckpt-15", *args], check=False)
    assert first.returncode == -signal.SIGKILL
    assert not (resumed_dir / "ckpt-15.json").exists(), (
        "the save in flight was expected to be cut short")
    second = run(["--dir", str(resumed_dir), "--out", out, *args])
    assert "resumed from" in second.stdout and "step 10," in second.stdout
    assert_same_training(str(tmp_path / "reference.npz"), out,
                         "SIGKILL during a background write")
    # No stray files of the cut-short save: every file belongs to a
    # committed checkpoint.
    committed = {p.name.removesuffix(".json")
                 for p in resumed_dir.glob("ckpt-*.json")}
    strays = [p.name for p in resumed_dir.iterdir()
              if p.name not in ("checkpoint", ".keras_ckpt-writer.json")
              and p.name.split(".")[0].split("_temp")[0] not in committed]
    assert strays == []
