"""The TensorFlow-free CLI: `keras-ckpt --help`, `--version`, `ls`, `verify`,
`pull`, `push` and `prune` run in a fresh interpreter without importing
TensorFlow or Keras, and print nothing on stderr when all is well;
`import keras_ckpt` is cheap until a TensorFlow-backed name is used."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_ckpt

HEAVY = ("tensorflow", "keras", "tf_keras")

# Runs the CLI like the console script, then reports which heavy modules the
# command imported on its last stdout line.
_WRAPPER = (
    "import json, sys\n"
    "from keras_ckpt import cli\n"
    "try:\n"
    "    rc = cli.main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    rc = e.code\n"
    "print(json.dumps(sorted(m for m in %r if m in sys.modules)))\n"
    "sys.exit(rc)\n" % (HEAVY,)
)


def run_cli(args, env):
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], capture_output=True,
        text=True, env=env, timeout=300,
    )
    *output, heavy = result.stdout.rstrip("\n").split("\n")
    return result, "\n".join(output), json.loads(heavy)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cli-imports") / "ckpts")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((8, 3), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0, callbacks=[
        keras_ckpt.Checkpoint(directory, save_freq=2, verbose=0,
                              on_preemption=None)])
    return directory


@pytest.mark.slow
def test_light_commands_import_no_tensorflow_and_are_quiet(
        trained_dir, tmp_path, s3_url, subprocess_env):
    env = subprocess_env()
    pulled = str(tmp_path / "pulled")
    commands = [
        ["--help"],
        ["--version"],
        ["ls", trained_dir],
        ["verify", trained_dir],
        ["push", trained_dir, s3_url, "--no-progress"],
        ["ls", s3_url],
        ["verify", s3_url],
        ["pull", s3_url, pulled, "--no-progress"],
        ["prune", pulled, "--keep", "1"],
    ]
    for args in commands:
        result, output, heavy = run_cli(args, env)
        assert result.returncode == 0, (args, result.stderr)
        assert heavy == [], f"keras-ckpt {' '.join(args)} imported {heavy}"
        assert result.stderr == "", (args, result.stderr)
    assert "ckpt-4" in run_cli(["ls", s3_url], env)[1]
    assert keras_ckpt.list_checkpoints(pulled)[-1].name == "ckpt-4"
    assert len(keras_ckpt.list_checkpoints(pulled)) == 1


@pytest.mark.slow
def test_inspect_still_reads_tensors(trained_dir, subprocess_env):
    result, output, heavy = run_cli(["inspect", trained_dir], subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "tensorflow" in heavy  # reads the tensors: the one that may


def test_import_is_lazy_until_a_tensorflow_name_is_used(subprocess_env):
    code = (
        "import json, sys, keras_ckpt\n"
        "before = 'tensorflow' in sys.modules\n"
        "names = dir(keras_ckpt)\n"
        "keras_ckpt.get_uploader, keras_ckpt.CheckpointInfo\n"
        "light = 'tensorflow' in sys.modules\n"
        "keras_ckpt.Checkpoint\n"
        "print(json.dumps([before, light, 'tensorflow' in sys.modules,\n"
        "                  sorted(set(keras_ckpt.__all__) - set(names))]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    before, light, after, missing = json.loads(result.stdout)
    assert (before, light, after, missing) == (False, False, True, [])


def test_every_public_name_resolves_and_unknown_names_raise():
    for name in keras_ckpt.__all__:
        assert getattr(keras_ckpt, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Checkpoints'"):
        keras_ckpt.Checkpoints


def test_listing_apis_import_no_tensorflow(trained_dir, s3_url,
                                           subprocess_env):
    """`keras_ckpt.list_checkpoints()` of a directory and of a mirror, and a
    store's own listing, import no TensorFlow (the README promises it;
    list_checkpoints used to live beside restore(), which does)."""
    keras_ckpt.get_uploader(s3_url).push(trained_dir)
    script = (
        "import json, sys\n"
        "import keras_ckpt\n"
        "local = keras_ckpt.list_checkpoints(sys.argv[1])\n"
        "remote = keras_ckpt.list_checkpoints(sys.argv[2])\n"
        "store = keras_ckpt.get_uploader(sys.argv[2]).list_checkpoints()\n"
        "print(json.dumps([[i.name for i in x] for x in (local, remote, store)]"
        " + [sorted(m for m in %r if m in sys.modules)]))\n" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", script, trained_dir,
                             s3_url], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    local, remote, store, heavy = json.loads(result.stdout.splitlines()[-1])
    assert local == remote == store == ["ckpt-2", "ckpt-4"]
    assert heavy == []
