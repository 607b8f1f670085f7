"""`keras-ckpt` end to end: every command on a local directory and on each
emulated store (file://, S3 via moto, GCS via fake-gcs-server, Azure Blob via
Azurite), plus usage errors, damaged checkpoints and missing buckets.

Most tests call `keras_ckpt.cli.main([...])` in-process (fast); one runs the
installed `keras-ckpt` console script.
"""

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ckpt
from keras_ckpt import cli

COMMANDS = ("ls", "inspect", "verify", "pull", "push", "export", "prune")
URL_FIXTURES = {"file": "file_url", "s3": "s3_url",
                "s3-seaweedfs": "seaweedfs_url", "gs": "gcs_url",
                "az": "azure_url"}
NAMES = ["ckpt-2", "ckpt-4", "ckpt-6", "ckpt-8"]


def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(4, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  metrics=["mae"])
    return model


def make_data():
    rng = np.random.RandomState(1)
    x = rng.rand(32, 4).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def train(model, directory, epochs=2):
    """Batches of 8, 4 per epoch, a save every 2 batches: ckpt-2 ... ckpt-8;
    val_loss is logged at epoch ends only (ckpt-4, ckpt-8)."""
    x, y = make_data()
    ckpt = keras_ckpt.Checkpoint(
        directory=str(directory), save_freq=2, on_preemption=None, verbose=0,
        max_to_keep=None,
    )
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              validation_data=(x[:8], y[:8]), callbacks=[ckpt])
    return str(directory)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A local directory with complete checkpoints ckpt-2, 4, 6, 8."""
    return train(make_model(), tmp_path_factory.mktemp("trained") / "ckpts")


@pytest.fixture(params=["local", *URL_FIXTURES])
def source(request, trained_dir, tmp_path):
    """The trained checkpoints in a fresh local directory or mirror."""
    if request.param == "local":
        path = str(tmp_path / "ckpts")
        shutil.copytree(trained_dir, path)
        return path
    url = request.getfixturevalue(URL_FIXTURES[request.param])
    keras_ckpt.get_uploader(url).push(trained_dir)
    return url


def run(capsys, *argv):
    """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def is_url(source):
    return "://" in source


def files(source):
    """{filename: size} of a local directory or a mirror."""
    if is_url(source):
        return keras_ckpt.get_uploader(source).list_files()
    return {f: os.path.getsize(os.path.join(source, f))
            for f in os.listdir(source)}


def read(source, filename):
    if is_url(source):
        return keras_ckpt.get_uploader(source).read_bytes(filename)
    with open(os.path.join(source, filename), "rb") as f:
        return f.read()


def write(source, filename, data, tmp_path):
    """Replaces one file behind keras_ckpt's back (damage, truncation)."""
    if is_url(source):
        local = tmp_path / f"upload-{uuid.uuid4().hex}"
        local.write_bytes(data)
        keras_ckpt.get_uploader(source).upload_file(str(local), filename)
    else:
        with open(os.path.join(source, filename), "wb") as f:
            f.write(data)


def remove(source, filename):
    if is_url(source):
        keras_ckpt.get_uploader(source).delete_file(filename)
    else:
        os.remove(os.path.join(source, filename))


def flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def metrics_by_name(trained_dir):
    return {i.name: i.metrics
            for i in keras_ckpt.list_checkpoints(trained_dir)}


def ls_json(capsys, source):
    code, out, err = run(capsys, "ls", source, "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}


def serve(path, x):
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    (output,) = fn(**{name: tf.constant(x)}).values()
    return output.numpy()


def restored_predictions(trained_dir, checkpoint, x):
    model = make_model()
    keras_ckpt.restore(model, trained_dir, checkpoint=checkpoint,
                       optimizer=False)
    return model.predict(x, verbose=0)


# ---------------------------------------------------------------------------
# Arguments, help, exit codes


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    prog = "keras-ckpt" if command is None else f"keras-ckpt {command}"
    assert out.startswith(f"usage: {prog}")
    if command is None:
        assert all(c in out for c in COMMANDS)
        assert "exit codes" in out
    else:
        assert "examples:" in out and "--debug" in out


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["ls"], "SOURCE"),
    (["prune", "{tmp}"], "--keep"),
    (["prune", "{tmp}", "--keep", "0"], "positive int"),
    (["prune", "{tmp}", "--keep", "2", "--keep-best", "1"], "--monitor"),
    (["export", "{tmp}", "{tmp}/out", "--layout", "vertex", "--version", "2"],
     "--version"),
    (["export", "{tmp}", "{tmp}/out", "--checkpoint", "best"], "--monitor"),
    (["export", "{tmp}", "{tmp}/out", "--checkpoint", "soon"], "soon"),
    (["export", "{tmp}", "{tmp}/out", "--layout", "zip"], "invalid choice"),
    (["ls", "ftp2://bucket/run"], "ftp2"),
    (["pull", "s3://bucket/run", "gs://bucket/run"], "local directory"),
])
def test_usage_errors_exit_2(capsys, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "usage: keras-ckpt" in err
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_failure_is_one_line_and_debug_shows_the_traceback(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, "verify", missing)
    assert code == 1
    assert err.startswith("keras-ckpt: error: ") and str(missing) in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--debug", "verify", missing)
    assert code == 1 and "Traceback (most recent call last)" in err
    code, _, err = run(capsys, "verify", missing, "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err


def test_missing_bucket_exits_1_naming_it(capsys, mirror_url, trained_dir,
                                          tmp_path):
    if mirror_url.startswith("file://"):
        bucket = str(tmp_path / f"missing-{uuid.uuid4().hex[:8]}")
        url = f"file://{bucket}/mirror"
    else:
        scheme = mirror_url.split("://")[0]
        bucket = f"kc-missing-{uuid.uuid4().hex[:8]}"
        url = f"{scheme}://{bucket}/runs/1"
    for argv in (["ls", url], ["push", trained_dir, url]):
        code, _, err = run(capsys, *argv)
        assert code == 1, err
        assert err.startswith("keras-ckpt: error: ")
        assert bucket in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script(trained_dir, subprocess_env):
    script = shutil.which("keras-ckpt", path=os.path.dirname(sys.executable))
    assert script, "the keras-ckpt console script is not installed"
    result = subprocess.run(
        [script, "ls", trained_dir, "--json"], env=subprocess_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)] == NAMES


# ---------------------------------------------------------------------------
# ls


def test_ls(capsys, source, trained_dir):
    code, out, err = run(capsys, "ls", source)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STEP", "EPOCH", "BATCH"]
    assert [line.split()[0] for line in lines[1:]] == NAMES
    assert "latest" in lines[-1] and "best" not in out.replace("MARKS", "")
    assert all("complete" in line for line in lines[1:])

    metrics = metrics_by_name(trained_dir)
    best = min((n for n in NAMES if "val_loss" in metrics[n]),
               key=lambda n: metrics[n]["val_loss"])
    rows = json.loads(run(capsys, "ls", source, "--json",
                          "--monitor", "val_loss")[1])
    assert [r["name"] for r in rows] == NAMES
    assert [(r["step"], r["epoch"], r["batch"]) for r in rows] == [
        (2, 0, 2), (4, 1, 0), (6, 1, 2), (8, 2, 0)]
    assert [r["latest"] for r in rows] == [False, False, False, True]
    assert [r["name"] for r in rows if r["best"]] == [best]
    assert all(r["complete"] and not r["problems"] for r in rows)
    sizes = files(source)
    for row in rows:
        assert row["metrics"] == metrics[row["name"]]
        assert row["size"] == sum(
            size for f, size in sizes.items()
            if f.startswith(row["name"] + ".") and not f.endswith(".json"))


def test_ls_lists_incomplete_checkpoints(capsys, source, tmp_path):
    remove(source, "ckpt-8.index")
    write(source, "ckpt-4.json", b"{not json", tmp_path)
    rows = ls_json(capsys, source)
    assert list(rows) == NAMES
    assert not rows["ckpt-8"]["complete"]
    assert "ckpt-8.index is missing" in rows["ckpt-8"]["problems"]
    assert not rows["ckpt-4"]["complete"] and rows["ckpt-4"]["step"] == 4
    assert "JSON" in rows["ckpt-4"]["problems"][0]
    # The latest is the newest checkpoint that can be restored.
    assert [n for n, r in rows.items() if r["latest"]] == ["ckpt-6"]
    code, out, _ = run(capsys, "ls", source)
    assert code == 0
    assert "INCOMPLETE" in out and "ckpt-8: ckpt-8.index is missing" in out


def test_ls_empty_directory(capsys, tmp_path):
    code, out, _ = run(capsys, "ls", tmp_path)
    assert code == 0 and "No checkpoints" in out
    code, out, _ = run(capsys, "ls", tmp_path, "--json")
    assert code == 0 and json.loads(out) == []


# ---------------------------------------------------------------------------
# inspect


def test_inspect(capsys, source):
    code, out, err = run(capsys, "inspect", source)
    assert code == 0, err
    assert "ckpt-8" in out.splitlines()[0] and "(complete)" in out
    assert "step 8, epoch 2, batch 0" in out
    assert "ckpt-8.data-00000-of-00001" in out and "ckpt-8.index" in out
    assert "tensorflow" in out and "keras_ckpt" in out
    # Layer names carry Keras' process-wide counters (dense_3 after other
    # tests built models), so match the structure, not the suffix.
    assert re.search(r"sequential(_\d+)?/dense(_\d+)?/kernel", out)
    assert "(4, 4)" in out
    assert "float32" in out and "optimizer:" in out
    # The model rebuilt from its stored config.
    assert "Model summary" in out and "Total params" in out

    sep = "/" if is_url(source) else os.sep
    code, out, err = run(capsys, "inspect", f"{source}{sep}ckpt-4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["name"] == "ckpt-4" and data["complete"]
    assert data["manifest"]["step"] == 4 and data["manifest"]["epoch"] == 1
    assert re.fullmatch(r"sequential(_\d+)?/dense(_\d+)?/kernel",
                        data["manifest"]["variables"]["model"][0][0])


def test_inspect_missing_checkpoint(capsys, trained_dir):
    code, _, err = run(capsys, "inspect", os.path.join(trained_dir, "ckpt-5"))
    assert code == 1 and "ckpt-5" in err and "ckpt-8" in err


# ---------------------------------------------------------------------------
# verify


def test_verify_finds_damaged_checkpoints(capsys, source, tmp_path):
    code, out, err = run(capsys, "verify", source)
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[:4]] == [
        ["OK", n] for n in NAMES]

    # Same size, different content: only the checksum can tell.
    data = read(source, "ckpt-6.index")
    write(source, "ckpt-6.index", flip_last_byte(data), tmp_path)
    data = read(source, "ckpt-2.data-00000-of-00001")
    write(source, "ckpt-2.data-00000-of-00001", data[:-3], tmp_path)
    code, out, err = run(capsys, "verify", source)
    assert code == 1
    lines = {line.split()[1].rstrip(":"): line for line in out.splitlines()
             if line.startswith(("OK", "BROKEN"))}
    assert lines["ckpt-6"].startswith("BROKEN")
    assert "ckpt-6.index fails its CRC32C checksum" in lines["ckpt-6"]
    assert lines["ckpt-2"].startswith("BROKEN") and "bytes" in lines["ckpt-2"]
    assert lines["ckpt-4"].startswith("OK")
    assert lines["ckpt-8"].startswith("OK")
    assert "ckpt-2" in err and "ckpt-6" in err and "ckpt-4" not in err

    sep = "/" if is_url(source) else os.sep
    assert run(capsys, "verify", f"{source}{sep}ckpt-8")[0] == 0
    code, out, _ = run(capsys, "verify", f"{source}{sep}ckpt-6", "--json")
    assert code == 1
    assert json.loads(out)["checkpoints"][0]["ok"] is False


def test_verify_reports_unfinished_uploads(capsys, source, tmp_path):
    write(source, "ckpt-10.data-00000-of-00001", b"partial", tmp_path)
    code, out, _ = run(capsys, "verify", source)
    assert code == 0
    assert "ckpt-10 has files but no manifest" in out


# ---------------------------------------------------------------------------
# pull / push


def dir_state(path):
    """{checkpoint file: (size, mtime)}: what a transfer would touch."""
    return {f: (os.path.getsize(os.path.join(path, f)),
                os.stat(os.path.join(path, f)).st_mtime_ns)
            for f in os.listdir(path) if f.startswith("ckpt-")}


def test_pull_resumes(capsys, source, tmp_path):
    dest = tmp_path / "pulled"
    code, out, err = run(capsys, "pull", source, dest, "--progress")
    assert code == 0, err
    assert "Pulled 4 checkpoint(s)" in out
    assert "B/s" in err  # the progress bar: bytes and rate
    assert tf.train.latest_checkpoint(str(dest)).endswith("ckpt-8")
    assert run(capsys, "verify", dest)[0] == 0

    # A second run transfers nothing and touches nothing.
    before = dir_state(dest)
    code, out, _ = run(capsys, "pull", source, dest)
    assert code == 0 and "0 B transferred" in out
    assert dir_state(dest) == before

    # An interrupted pull: one file missing, another cut short.
    os.remove(dest / "ckpt-8.index")
    data = dest / "ckpt-6.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:10])
    code, out, err = run(capsys, "pull", source, dest)
    assert code == 0, err
    assert "0 B transferred" not in out
    assert run(capsys, "verify", dest)[0] == 0
    unchanged = {f for f in before if f.startswith(("ckpt-2", "ckpt-4"))}
    assert {f: dir_state(dest)[f] for f in unchanged} == {
        f: before[f] for f in unchanged}


def test_pull_one_checkpoint(capsys, source, tmp_path):
    sep = "/" if is_url(source) else os.sep
    code, out, err = run(capsys, "pull", f"{source}{sep}ckpt-4",
                         tmp_path / "one")
    assert code == 0, err
    assert list(ls_json(capsys, tmp_path / "one")) == ["ckpt-4"]


def test_push_resumes(capsys, mirror_url, trained_dir):
    code, out, err = run(capsys, "push", trained_dir, mirror_url,
                         "--progress")
    assert code == 0, err
    assert "Pushed 4 checkpoint(s)" in out and "B/s" in err
    rows = ls_json(capsys, mirror_url)
    assert list(rows) == NAMES and all(r["complete"] for r in rows.values())
    assert keras_ckpt.get_uploader(mirror_url).read_pointer() == (
        "ckpt-8", NAMES)
    assert run(capsys, "verify", mirror_url)[0] == 0

    code, out, _ = run(capsys, "push", trained_dir, mirror_url)
    assert code == 0 and "0 B transferred" in out

    # An interrupted push: a checkpoint whose data never arrived.
    remove(mirror_url, "ckpt-6.data-00000-of-00001")
    assert not ls_json(capsys, mirror_url)["ckpt-6"]["complete"]
    code, out, err = run(capsys, "push", trained_dir, mirror_url)
    assert code == 0, err
    assert "0 B transferred" not in out
    assert run(capsys, "verify", mirror_url)[0] == 0


def test_push_refuses_an_empty_directory(capsys, file_url, tmp_path):
    code, _, err = run(capsys, "push", tmp_path, file_url)
    assert code == 1 and "No complete checkpoint" in err


# ---------------------------------------------------------------------------
# export


@pytest.mark.parametrize("source", ["local", "s3", "gs", "az"], indirect=True)
def test_export(capsys, source, trained_dir, tmp_path):
    x, _ = make_data()
    out = tmp_path / "export"
    code, stdout, err = run(capsys, "export", source, out)
    assert code == 0, err
    assert (out / "1" / "saved_model.pb").exists()
    assert "ckpt-8" in stdout and str(out / "1") in stdout
    np.testing.assert_allclose(
        serve(str(out / "1"), x),
        restored_predictions(trained_dir, "latest", x), rtol=1e-5, atol=1e-6)

    code, _, err = run(capsys, "export", source, out)
    assert code == 1 and "--overwrite" in err

    vertex = tmp_path / "vertex"
    code, _, err = run(capsys, "export", source, vertex, "--layout", "vertex",
                       "--checkpoint", "4")
    assert code == 0, err
    assert (vertex / "saved_model.pb").exists()
    np.testing.assert_allclose(
        serve(str(vertex), x), restored_predictions(trained_dir, 4, x),
        rtol=1e-5, atol=1e-6)


def test_export_best_with_version(capsys, trained_dir, tmp_path):
    x, _ = make_data()
    metrics = metrics_by_name(trained_dir)
    worst = max((n for n in NAMES if "val_loss" in metrics[n]),
                key=lambda n: metrics[n]["val_loss"])
    out = tmp_path / "sm"
    out.mkdir()
    (out / "3").mkdir()
    (out / "3" / "old").write_text("previous export")
    code, stdout, err = run(
        capsys, "export", trained_dir, out, "--layout", "sagemaker",
        "--version", "3", "--checkpoint", "best", "--monitor", "val_loss",
        "--mode", "max", "--overwrite")
    assert code == 0, err
    assert worst in stdout and not (out / "3" / "old").exists()
    np.testing.assert_allclose(
        serve(str(out / "3"), x), restored_predictions(trained_dir, worst, x),
        rtol=1e-5, atol=1e-6)


def test_export_without_model_config(capsys, tmp_path):
    class Net(keras.Model):  # get_config() cannot serialize `fn`
        def __init__(self, fn):
            super().__init__()
            self.fn = fn
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(self.fn(x))

    model = Net(lambda t: t * 2.0)
    model.compile(optimizer="adam", loss="mse")
    directory = train(model, tmp_path / "ckpts", epochs=1)
    code, _, err = run(capsys, "export", directory, tmp_path / "out")
    assert code == 1
    assert "subclassed model without get_config()" in err
    assert "keras_ckpt.export_saved_model" in err
    assert len(err.strip().splitlines()) == 1


def test_export_imports_custom_objects(capsys, tmp_path, monkeypatch):
    module = f"cli_custom_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        import keras

        @keras.saving.register_keras_serializable(package="CliTest")
        class Scale(keras.layers.Layer):
            def build(self, input_shape):
                self.scale = self.add_weight(shape=(), initializer="ones")

            def call(self, x):
                return x * self.scale
    """))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    custom = __import__(module)
    model = keras.Sequential([keras.Input((4,)), custom.Scale(),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = train(model, tmp_path / "ckpts", epochs=1)

    # A fresh process would not know `Scale` until its module is imported.
    monkeypatch.delitem(keras.saving.get_custom_objects(), "CliTest>Scale")
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in (str(tmp_path), "")])
    monkeypatch.chdir(tmp_path)  # --import finds modules where it runs
    code, _, err = run(capsys, "export", directory, tmp_path / "out")
    assert code == 1 and "--import MODULE" in err
    code, _, err = run(capsys, "export", directory, tmp_path / "out",
                       "--import", module)
    assert code == 0, err
    assert (tmp_path / "out" / "1" / "saved_model.pb").exists()
    code, _, err = run(capsys, "export", directory, tmp_path / "out2",
                       "--import", "no_such_module_xyz")
    assert code == 1 and "no_such_module_xyz" in err


# ---------------------------------------------------------------------------
# prune


def test_prune(capsys, source, trained_dir):
    code, out, err = run(capsys, "prune", source, "--keep", "1", "--dry-run")
    assert code == 0, err
    assert "would delete" in out and "dry run" in out
    assert list(ls_json(capsys, source)) == NAMES  # nothing deleted

    metrics = metrics_by_name(trained_dir)
    worst = max((n for n in NAMES if "val_loss" in metrics[n]),
                key=lambda n: metrics[n]["val_loss"])
    assert worst != "ckpt-8"
    code, out, err = run(capsys, "prune", source, "--keep", "1",
                         "--keep-best", "1", "--monitor", "val_loss",
                         "--mode", "max")
    assert code == 0, err
    rows = ls_json(capsys, source)
    assert list(rows) == sorted({worst, "ckpt-8"}, key=NAMES.index)
    assert rows["ckpt-8"]["latest"]
    remaining = files(source)
    assert not any(f.startswith(("ckpt-2.", "ckpt-6.")) for f in remaining)
    if is_url(source):
        assert keras_ckpt.get_uploader(source).read_pointer()[0] == "ckpt-8"
    else:
        assert tf.train.latest_checkpoint(source).endswith("ckpt-8")
    assert run(capsys, "verify", source)[0] == 0

    # The latest survives even --keep 1 with a best elsewhere.
    code, out, _ = run(capsys, "prune", source, "--keep", "1")
    assert code == 0 and list(ls_json(capsys, source)) == ["ckpt-8"]


def test_prune_leaves_incomplete_checkpoints_alone(capsys, source):
    remove(source, "ckpt-4.index")
    code, out, err = run(capsys, "prune", source, "--keep", "1")
    assert code == 0, err
    assert "skip (incomplete)" in out
    rows = ls_json(capsys, source)
    assert list(rows) == ["ckpt-4", "ckpt-8"]
    assert not rows["ckpt-4"]["complete"] and rows["ckpt-8"]["latest"]


def interrupt_on_call(monkeypatch, method, n):
    """Makes `Uploader.<method>` raise KeyboardInterrupt on its n-th call,
    like Ctrl-C in the middle of a transfer."""
    from keras_ckpt.store.base import Uploader

    original = getattr(Uploader, method)
    calls = []

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Uploader, method, wrapper)


def test_interrupted_pull_and_push_resume(capsys, trained_dir, file_url,
                                          tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, "upload_file", 3)  # in ckpt-4's data
        code, _, err = run(capsys, "push", trained_dir, file_url)
    assert code == 130 and "interrupted" in err and "again" in err
    assert [n for n, r in ls_json(capsys, file_url).items()
            if r["complete"]] == ["ckpt-2"]
    code, out, err = run(capsys, "push", trained_dir, file_url)
    assert code == 0, err
    assert run(capsys, "verify", file_url)[0] == 0

    dest = tmp_path / "pulled"
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, "download_file", 3)
        assert run(capsys, "pull", file_url, dest)[0] == 130
    first = dir_state(dest)
    assert sorted(os.listdir(dest)) == [  # no partial file left behind
        "ckpt-2.data-00000-of-00001", "ckpt-2.index", "ckpt-2.json"]
    code, out, err = run(capsys, "pull", file_url, dest)
    assert code == 0, err
    assert {f: dir_state(dest)[f] for f in first} == first  # not re-sent
    assert run(capsys, "verify", dest)[0] == 0
