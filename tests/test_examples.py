"""Smoke tests: each example under examples/ runs as documented, on CPU, with
no cloud (file:// mirror, the GCS emulator for Vertex AI), in a subprocess
whose working directory is a fresh tmp dir.

- sagemaker/train.py with SageMaker's environment: exports
  `$SM_MODEL_DIR/1/saved_model.pb`, which serves.
- vertex/task.py with `AIP_*` pointing at the GCS emulator: mirrors its
  checkpoints there and uploads `saved_model.pb` at the model dir's root.
- preemptible_vm.py with its default file:// mirror; then SIGTERM mid-run:
  exit 143, no export; the same command on a wiped disk resumes from the
  mirror and finishes.
- sagemaker/launch.py and vertex/submit.py without their SDKs: print the job
  and exit 0.
- quickstart.py: preempted, resumed, bitwise identical.
"""

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

import keras_ckpt

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

# Set by a platform or by the user's shell; each test sets what it needs.
_PLATFORM_VARS = (
    "SM_MODEL_DIR", "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "CLOUD_ML_JOB_ID",
    "AZUREML_RUN_ID", "KERAS_CKPT_DIR", "KERAS_CKPT_MIRROR", "TF_CONFIG",
    "CLUSTER_SPEC",
)


@pytest.fixture
def env(subprocess_env):
    """`env(**extra)`: the subprocess environment, without platform variables
    leaking in from the machine, plus `extra`."""

    def make(**extra):
        result = subprocess_env()
        for name in _PLATFORM_VARS:
            result.pop(name, None)
        result.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        result.update({k: str(v) for k, v in extra.items()})
        return result

    return make


def _command(script, args):
    return [sys.executable, os.path.join(EXAMPLES, script), *map(str, args)]


def run_example(script, *args, cwd, env, timeout=240):
    os.makedirs(cwd, exist_ok=True)
    return subprocess.run(_command(script, args), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def report(result):
    return (f"exit status {result.returncode}\n--- stdout ---\n"
            f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")


def serve(saved_model_dir):
    served = tf.saved_model.load(str(saved_model_dir))
    signature = served.signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]
    assert name == "features"
    x = tf.constant([[0.1, 0.2, 0.3, 0.4]], tf.float32)
    return next(iter(signature(features=x).values())).numpy()


# ---------------------------------------------------------------------------
# SageMaker
# ---------------------------------------------------------------------------

def test_sagemaker_train_exports_where_sagemaker_serves(tmp_path, env):
    model_dir = tmp_path / "opt-ml-model"
    checkpoints = tmp_path / "opt-ml-checkpoints"
    job = tmp_path / "job"
    # SageMaker passes hyperparameters as arguments, and the TensorFlow
    # estimator adds --model_dir.
    result = run_example(
        "sagemaker/train.py", "--epochs", 2, "--batch_size", 32,
        "--model_dir", "s3://bucket/ignored", cwd=job,
        env=env(SM_MODEL_DIR=model_dir, KERAS_CKPT_DIR=checkpoints))
    assert result.returncode == 0, report(result)
    assert "Detected SageMaker" in result.stdout, report(result)
    assert (model_dir / "1" / "saved_model.pb").is_file(), report(result)
    assert serve(model_dir / "1").shape == (1, 1)
    final = keras_ckpt.list_checkpoints(str(checkpoints))[-1]
    assert final.complete and (final.epoch, final.batch) == (2, 0)
    assert not (job / "checkpoints").exists() and not (job / "export").exists()


def test_sagemaker_train_runs_locally_with_local_defaults(tmp_path, env):
    result = run_example("sagemaker/train.py", "--epochs", 1,
                         "--steps-per-epoch", 10, cwd=tmp_path, env=env())
    assert result.returncode == 0, report(result)
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file()
    assert glob.glob(str(tmp_path / "checkpoints" / "ckpt-*.json"))


# ---------------------------------------------------------------------------
# Vertex AI
# ---------------------------------------------------------------------------

def test_vertex_task_mirrors_to_gcs_and_exports_at_the_model_root(
        tmp_path, gcs_url, env):
    scratch = tmp_path / "tmp"  # the preset's local working dir goes here
    scratch.mkdir()
    result = run_example(
        "vertex/task.py", "--epochs", 2, cwd=tmp_path / "job",
        env=env(AIP_MODEL_DIR=f"{gcs_url}/model",
                AIP_CHECKPOINT_DIR=f"{gcs_url}/checkpoints",
                CLOUD_ML_JOB_ID=f"test-{uuid.uuid4().hex[:8]}",
                TMPDIR=scratch))
    assert result.returncode == 0, report(result)
    assert "Detected Vertex AI" in result.stdout, report(result)
    names = keras_ckpt.get_uploader(f"{gcs_url}/model").list_files()
    assert "saved_model.pb" in names, names  # at the root, no version dir
    assert not any(name.startswith("1/") for name in names), names
    mirrored = keras_ckpt.list_checkpoints(f"{gcs_url}/checkpoints")
    assert mirrored[-1].complete and mirrored[-1].epoch == 2, mirrored


# ---------------------------------------------------------------------------
# Plain preemptible VM
# ---------------------------------------------------------------------------

def test_preemptible_vm_with_the_default_file_mirror(tmp_path, env):
    result = run_example("preemptible_vm.py", "--epochs", 2, cwd=tmp_path,
                         env=env())
    assert result.returncode == 0, report(result)
    mirror = f"file://{os.path.realpath(tmp_path)}/mirror"
    assert f"done: the mirror {mirror} holds step 80" in result.stdout, (
        report(result))
    final = keras_ckpt.list_checkpoints(mirror)[-1]
    assert final.complete and final.step == 2 * 40
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file()


def test_preemptible_vm_sigterm_then_resume_on_a_fresh_disk(tmp_path, env):
    job_env = env()
    args = ["--epochs", 3]
    local = tmp_path / "checkpoints"
    process = subprocess.Popen(
        _command("preemptible_vm.py", args + ["--step-delay", 0.05]),
        cwd=tmp_path, env=job_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(str(local / "ckpt-*.json")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # the preemption notice
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    first = subprocess.CompletedProcess(process.args, process.returncode,
                                        stdout, stderr)
    assert first.returncode == 143, report(first)
    assert "preemption notice (SIGTERM)" in stdout, report(first)
    assert not (tmp_path / "export").exists(), "a preempted run must not export"
    mirror = f"file://{os.path.realpath(tmp_path)}/mirror"
    saved = keras_ckpt.list_checkpoints(mirror)[-1]
    assert saved.complete and 0 < saved.step < 3 * 40

    shutil.rmtree(local)  # a fresh VM: only the mirror survives
    second = run_example("preemptible_vm.py", *args, cwd=tmp_path, env=job_env)
    assert second.returncode == 0, report(second)
    assert f"resumed from {mirror}/{saved.name}: step {saved.step}," in second.stdout, (
        report(second))
    assert keras_ckpt.list_checkpoints(mirror)[-1].step == 3 * 40
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file()


# ---------------------------------------------------------------------------
# Launchers: no SDK installed -> print the job, exit 0
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("script, module, expected", [
    ("sagemaker/launch.py", "sagemaker",
     ["sagemaker.tensorflow.TensorFlow(", "'entry_point': 'train.py'",
      "'use_spot_instances': True", "'checkpoint_s3_uri': 's3://",
      "'checkpoint_local_path': '/opt/ml/checkpoints'", "'max_wait'"]),
    ("vertex/submit.py", "google.cloud.aiplatform",
     ["CustomJob.from_local_script(", "task.py", "'base_output_dir': 'gs://",
      "'scheduling_strategy': gca_custom_job.Scheduling.Strategy.SPOT",
      "'restart_job_on_worker_restart': True"]),
])
def test_launchers_print_the_job_without_their_sdk(tmp_path, env, script,
                                                   module, expected):
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        installed = False
    # Never launch a real job from the tests.
    args = ["--dry-run"] if installed else []
    result = run_example(script, *args, cwd=tmp_path, env=env(), timeout=60)
    assert result.returncode == 0, report(result)
    for text in expected:
        assert text in result.stdout, report(result)


# ---------------------------------------------------------------------------
# Quick start
# ---------------------------------------------------------------------------

def test_quickstart(tmp_path, env):
    result = run_example("quickstart.py", "--workdir", "tmp", cwd=tmp_path,
                         env=env(), timeout=300)
    assert result.returncode == 0, report(result)
    assert "bitwise identical to uninterrupted run: True" in result.stdout, (
        report(result))


def test_custom_loop_is_preempted_and_resumes_from_the_mirror(tmp_path, env):
    """examples/custom_loop.py: a GradientTape loop on CheckpointManager,
    SIGTERMed at step 30 (exit 143), its local disk wiped, resumed from the
    file:// mirror, bitwise equal to an uninterrupted run."""
    first = run_example("custom_loop.py", "--preempt-at-step", "30",
                        cwd=tmp_path, env=env())
    assert first.returncode == 143, report(first)
    shutil.rmtree(tmp_path / "checkpoints")
    second = run_example("custom_loop.py", "--reference", cwd=tmp_path,
                         env=env())
    assert second.returncode == 0, report(second)
    assert "resumed from file://" in second.stdout, report(second)
    assert "bitwise equal to an uninterrupted run: True" in second.stdout, (
        report(second))


def test_readme_shows_every_example():
    with open(os.path.join(EXAMPLES, "README.md")) as f:
        readme = f.read()
    for script in ("quickstart.py", "sagemaker/train.py", "sagemaker/launch.py",
                   "vertex/task.py", "vertex/submit.py", "preemptible_vm.py",
                   "custom_loop.py"):
        assert os.path.isfile(os.path.join(EXAMPLES, script))
        assert f"examples/{script}" in readme, script
