"""A custom training loop on `keras_ckpt.CheckpointManager` resumes exactly.

Real subprocesses run tests/scripts/custom_loop.py (a `tf.GradientTape` loop
with Dropout, Adam on a schedule and a shuffled, repeated tf.data input):
one uninterrupted, one SIGKILLed at a random step and started again with the
same command. The final model and optimizer variables, and the next batch
the input yields, must match bitwise.
"""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from test_exactness import assert_same_training

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "custom_loop.py")
SEED = int(os.environ.get("KERAS_CKPT_TEST_SEED", random.randrange(1 << 30)))


def run(args, env, check=True):
    result = subprocess.run([sys.executable, SCRIPT, *args],
                            capture_output=True, text=True, timeout=300,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"custom_loop.py {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_gradient_tape_loop_sigkill_and_resume_is_bitwise_exact(
        tmp_path, subprocess_env, mode):
    extra = ["--sync"] if mode == "sync" else []
    kill_at = random.Random(f"{SEED}-{mode}").randint(6, 34)
    context = (f"custom loop ({mode}), SIGKILL after step {kill_at} "
               f"(KERAS_CKPT_TEST_SEED={SEED})")
    env = subprocess_env()
    reference = str(tmp_path / "reference.npz")
    run(["--dir", str(tmp_path / "reference"), "--out", reference, *extra],
        env)

    resumed_dir = str(tmp_path / "resumed")
    out = str(tmp_path / "resumed.npz")
    first = run(["--dir", resumed_dir, "--out", out, "--kill-at-step",
                 str(kill_at), *extra], env, check=False)
    assert first.returncode == -signal.SIGKILL, (
        f"{context}: expected the first run to be killed\n"
        f"{first.stderr[-2000:]}")
    second = run(["--dir", resumed_dir, "--out", out, *extra], env)
    assert "keras_ckpt: resumed from" in second.stdout, second.stdout
    assert_same_training(reference, out, context)


@pytest.mark.slow
@pytest.mark.parametrize("on_preemption", ["exit", "stop"])
def test_gradient_tape_loop_sigterm_saves_and_resumes_exactly(
        tmp_path, subprocess_env, on_preemption):
    sigterm_at = random.Random(f"{SEED}-sigterm").randint(6, 34)
    context = (f"custom loop, SIGTERM after step {sigterm_at}, "
               f"on_preemption={on_preemption} (KERAS_CKPT_TEST_SEED={SEED})")
    env = subprocess_env()
    reference = str(tmp_path / "reference.npz")
    run(["--dir", str(tmp_path / "reference"), "--out", reference], env)

    resumed_dir = tmp_path / "resumed"
    out = str(tmp_path / "resumed.npz")
    args = ["--dir", str(resumed_dir), "--out", out,
            "--on-preemption", on_preemption]
    first = run([*args, "--sigterm-at-step", str(sigterm_at)], env,
                check=False)
    # The notice is handled at the step after the one it came in.
    preempted_at = sigterm_at + 1
    if on_preemption == "exit":
        assert first.returncode == 143, f"{context}\n{first.stderr[-2000:]}"
        assert not os.path.exists(out)
    else:  # the loop saw reached_preemption and ended by itself
        assert first.returncode == 0, f"{context}\n{first.stderr[-2000:]}"
        with open(out + ".json") as f:
            stopped = json.load(f)
        assert stopped["preempted"] and stopped["step"] == preempted_at
    assert (resumed_dir / f"ckpt-{preempted_at}.json").exists(), context
    second = run(args, env)
    assert f"resumed from {resumed_dir}: step {preempted_at}," in (
        second.stdout), second.stdout
    assert_same_training(reference, out, context)
