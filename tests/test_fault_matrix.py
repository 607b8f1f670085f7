"""The fault matrix: a job dies at every step of the commit protocol, or its
network fails mid-upload, on file://, S3 (moto and SeaweedFS), GCS and
Azure; the job is then restarted on the same machine and on a fresh one (an
empty disk and the mirror as the fault left it). Each time:

- the pointer (local and mirror) names only complete checkpoints,
- the restart resumes from the newest checkpoint committed before the fault
  (nothing committed is lost),
- and training ends bitwise equal to an uninterrupted run (resume is exact).

`make test` runs a few cells of the matrix; `make test-long`
(`KERAS_CKPT_FULL_MATRIX=1`) runs all of them.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from keras_ckpt import manifest as manifest_lib
from keras_ckpt.manager import LocalCheckpoints
from keras_ckpt.store import get_uploader
from test_e2e import assert_same
from test_e2e import run

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
FAULT_JOB = os.path.join(HERE, "scripts", "fault_job.py")
# 48 steps, a save every 5 (10 saves), 2 kept + the best; a state large
# enough (~30 KB) for a connection to be cut in the middle of a file.
ARGS = ["--save-freq", "5", "--lr", "plateau", "--hidden", "128"]
MIRROR_OPTIONS = dict(retries=6, backoff=0.05, max_backoff=0.2, timeout=3,
                      check_timeout=3, request_retries=0)
KILL_STEPS = (
    "local-data", "local-index", "local-manifest", "local-pointer",
    "local-retention", "mirror-data", "mirror-index", "mirror-manifest",
    "mirror-pointer", "mirror-retention",
)
NETWORK_FAULTS = ("cut", "5xx", "stall")
FULL = os.environ.get("KERAS_CKPT_FULL_MATRIX") == "1"
URL_FIXTURES = {"file": "file_url", "s3": "s3_url",
                "s3-seaweedfs": "seaweedfs_url", "gs": "gcs_url",
                "az": "azure_url"}

if FULL:
    KILLS = [(s, k) for s in URL_FIXTURES for k in KILL_STEPS]
    NETWORK = [(s, f) for s in ("s3", "s3-seaweedfs", "gs", "az")
               for f in NETWORK_FAULTS]
else:
    KILLS = [("file", "local-index"), ("file", "local-pointer"),
             ("s3", "mirror-index"), ("s3-seaweedfs", "mirror-manifest"),
             ("gs", "mirror-pointer"), ("az", "mirror-retention")]
    NETWORK = [("s3", "cut"), ("s3-seaweedfs", "5xx"), ("gs", "5xx"),
               ("az", "stall")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that every restarted run must equal."""
    root = tmp_path_factory.mktemp("reference")
    run(["--dir", str(root / "ckpts"), "--out", str(root / "out.npz"), *ARGS],
        dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return str(root / "out.npz")


def fault_job(options, job, env, wait=True):
    command = [sys.executable, FAULT_JOB, *options, "--mirror-options",
               json.dumps(MIRROR_OPTIONS), "--", *job]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=600)


def newest_committed(directory, url):
    """(newest step locally or on the mirror, newest step on the mirror),
    after checking that every pointer names only complete checkpoints."""
    local = LocalCheckpoints(directory).manifests() if directory else []
    latest = tf.train.latest_checkpoint(directory) if directory else None
    if latest is not None:
        assert os.path.basename(latest) in {m.name for m in local}, (
            f"the local pointer names an incomplete {latest}")
    store = get_uploader(url, **MIRROR_OPTIONS)
    remote = store.complete_manifests()
    _, pointed = store.read_pointer()
    assert set(pointed) <= {m.name for m in remote}, (
        f"the mirror's pointer names incomplete checkpoints: {pointed}")

    def newest(manifests):
        return max(manifests, key=lambda m: manifest_lib.step_of(m.name)).step

    return newest(local + remote), newest(remote) if remote else None


def snapshot(url):
    """Copies the mirror as it is now to a new prefix; returns its URL."""
    source = get_uploader(url, **MIRROR_OPTIONS)
    copy_url = url + "-fresh-machine"
    copy = get_uploader(copy_url, **MIRROR_OPTIONS)
    scratch = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                           f"kc-snapshot-{os.getpid()}")
    for name in source.list_files():
        source.download_file(name, scratch)
        copy.upload_file(scratch, name)
    os.remove(scratch)
    return copy_url


def resumed_step(output):
    match = re.search(r"resumed from \S+: step (\d+),", output)
    return int(match.group(1)) if match else None


def restart_twice(tmp_path, url, env, reference, fresh_url):
    """The same machine, then a fresh one: both exact, both from the newest
    committed checkpoint."""
    local = str(tmp_path / "vm1")
    expected_same, expected_fresh = newest_committed(local, url)
    same_out = str(tmp_path / "same.npz")
    same = run(["--dir", local, "--mirror", url, "--out", same_out, *ARGS],
               env)
    assert resumed_step(same.stdout) == expected_same, same.stdout[-3000:]
    assert_same(reference, same_out)

    fresh_out = str(tmp_path / "fresh.npz")
    fresh = run(["--dir", str(tmp_path / "vm2"), "--mirror", fresh_url,
                 "--out", fresh_out, *ARGS], env)
    assert resumed_step(fresh.stdout) == expected_fresh, fresh.stdout[-3000:]
    assert_same(reference, fresh_out)


@pytest.mark.parametrize("scheme,step", KILLS)
def test_killed_at_a_step_of_the_commit_protocol(
        scheme, step, request, tmp_path, subprocess_env, reference):
    url = request.getfixturevalue(URL_FIXTURES[scheme])
    env = subprocess_env()
    job = ["--dir", str(tmp_path / "vm1"), "--mirror", url, *ARGS]
    killed = fault_job(["--kill", step, "--at-save", "4"], job, env)
    assert killed.returncode == 137, (
        f"the fault was never reached:\n{killed.stdout[-3000:]}"
        f"{killed.stderr[-3000:]}")
    restart_twice(tmp_path, url, env, reference, snapshot(url))


@pytest.mark.parametrize("proxied_mirror,fault", NETWORK,
                         indirect=["proxied_mirror"])
def test_network_fault_during_an_upload(
        proxied_mirror, fault, tmp_path, subprocess_env, reference):
    url, proxy, _ = proxied_mirror
    env = subprocess_env()
    local = tmp_path / "vm1"
    job = ["--dir", str(local), "--mirror", url, "--batch-sleep", "0.1",
           *ARGS]
    process = fault_job(["--pause-at-save", "3"], job, env, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(f"{local}.paused"):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The next save's first requests (lease, listing) and then its data
        # file meet the fault.
        if fault == "cut":
            proxy.fail_after(12_000)  # the network dies mid-file for 2 s
        elif fault == "5xx":
            proxy.reply_next(5, 503)
        else:
            proxy.stall_next(1)
        open(f"{local}.go", "w").close()
        if fault == "cut":
            time.sleep(2)
            proxy.heal()
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    proxy.heal()
    assert process.returncode == 0, output[-3000:]
    faults = {"cut": proxy.resets, "5xx": proxy.replies,
              "stall": proxy.stalls}[fault]
    assert faults > 0, "the fault never hit a request"
    restart_twice(tmp_path, url, env, reference, snapshot(url))
