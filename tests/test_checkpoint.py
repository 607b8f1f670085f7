"""The Checkpoint callback in-process: what it saves, retention, errors."""

import json
import logging
import os
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ckpt
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.engine import state as state_lib


def make_model(units=8, seed=0, lr=0.01):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse",
                  metrics=["mae"])
    return model


def make_data(n=48):
    rng = np.random.RandomState(1)
    x = rng.rand(n, 4).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    return x, y


def fit(model, ckpt, epochs=2, extra=(), validation=False, **kwargs):
    x, y = make_data()
    return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False,
                     verbose=0, callbacks=[ckpt, *extra],
                     validation_data=(x[:16], y[:16]) if validation else None,
                     **kwargs)


def ckpt_args(**kwargs):
    kwargs.setdefault("on_preemption", None)
    kwargs.setdefault("verbose", 0)
    return kwargs


def dir_state(path):
    """{filename: (size, mtime_ns)} of every file below `path` but the
    writer lease, which every job that starts takes over."""
    state = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f == ".keras_ckpt-writer.json":
                continue
            st = os.stat(os.path.join(root, f))
            state[os.path.relpath(os.path.join(root, f), path)] = (
                st.st_size, st.st_mtime_ns)
    return state


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"save_freq": -1}, "save_freq"),
    ({"save_freq": "batch"}, "save_freq"),
    ({"save_freq": 1.5}, "save_freq"),
    ({"save_every_seconds": 0}, "save_every_seconds"),
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"keep_best": -1}, "keep_best"),
    ({"mode": "lowest"}, "mode"),
    ({"resume": 3}, "resume"),
    ({"resume": "best"}, "resume"),
    ({"when_busy": "drop"}, "when_busy"),
    ({"on_preemption": "kill"}, "on_preemption"),
    ({"keep_every_n_hours": -2}, "keep_every_n_hours"),
    ({"state": ["x"]}, "state"),
    ({"state": {"x": object()}}, "state"),
    ({"mirror": "ftp://host/path"}, "mirror"),
    ({"mirror": "file://relative/path"}, "mirror"),
])
def test_invalid_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_ckpt.Checkpoint(directory=tmp_path / "c", **ckpt_args(**kwargs))
    assert not (tmp_path / "c").exists()


def test_directory_that_is_a_file_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "ckpts"
    target.write_text("not a directory")
    with pytest.raises(keras_ckpt.CheckpointWriteError, match="not a directory"):
        keras_ckpt.Checkpoint(directory=target, **ckpt_args())
    with pytest.raises(OSError):
        keras_ckpt.Checkpoint(directory=target / "sub", **ckpt_args())
    assert target.read_text() == "not a directory"


def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                             str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB filesystem: room for a few small checkpoints, then ENOSPC."""
    path = _mount_tmpfs(tmp_path / "disk", "size=256k")
    yield path
    subprocess.run(["umount", "-l", str(path)])


@pytest.fixture
def read_only_dir(tmp_path):
    path = _mount_tmpfs(tmp_path / "ro", "ro,size=64k")
    yield path
    subprocess.run(["umount", "-l", str(path)])


def test_unwritable_directory_fails_at_construction(read_only_dir):
    with pytest.raises(keras_ckpt.CheckpointWriteError, match="cannot write"):
        keras_ckpt.Checkpoint(directory=read_only_dir / "ckpts", **ckpt_args())


# ---------------------------------------------------------------------------
# What a checkpoint holds, and the layout
# ---------------------------------------------------------------------------

def test_layout_manifest_and_tf_interoperability(tmp_path):
    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, save_freq=3,
                                 **ckpt_args(max_to_keep=None))
    fit(model, ckpt, epochs=2)  # 6 batches per epoch -> saves 3, 6, 9, 12
    names = sorted(p.name for p in tmp_path.iterdir())
    for step in (3, 6, 9, 12):
        for suffix in (".data-00000-of-00001", ".index", ".json"):
            assert f"ckpt-{step}{suffix}" in names
    assert "checkpoint" in names
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-12")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), str(tmp_path),
                                         max_to_keep=None)
    assert [os.path.basename(p) for p in manager.checkpoints] == [
        "ckpt-3", "ckpt-6", "ckpt-9", "ckpt-12"]

    manifest = manifest_lib.Manifest.read(tmp_path / "ckpt-9.json")
    assert (manifest.step, manifest.epoch, manifest.batch) == (9, 1, 3)
    for filename, entry in manifest.files.items():
        assert (tmp_path / filename).stat().st_size == entry["size"]
        assert manifest_lib.file_checksum(tmp_path / filename) == entry["crc32c"]
    paths = [spec[0] for spec in manifest.variables["model"]]
    assert any("seed_generator" in p for p in paths), paths  # dropout RNG
    assert any("iteration" in s[0] for s in manifest.variables["optimizer"])
    assert manifest.variables["metrics"]
    assert manifest.metadata["versions"]["keras"] == keras.__version__
    assert manifest.metadata["model_config"]["class_name"] == "Sequential"
    assert "loss" in manifest.metrics


def test_saved_values_are_the_values_at_the_save_step(tmp_path):
    """Async snapshots equal synchronous saves at the same step, bitwise."""
    results = {}
    for mode in ("sync", "async"):
        model = make_model(units=64)
        ckpt = keras_ckpt.Checkpoint(
            directory=tmp_path / mode, save_freq=2,
            **ckpt_args(max_to_keep=None, async_save=mode == "async"))
        fit(model, ckpt, epochs=2)
        results[mode] = {
            m.name: tf.train.load_checkpoint(str(tmp_path / mode / m.name))
            for m in ckpt._store.manifests()
        }
    assert results["sync"].keys() == results["async"].keys()
    assert len(results["sync"]) == 6
    for name, sync_reader in results["sync"].items():
        async_reader = results["async"][name]
        for key in sync_reader.get_variable_to_shape_map():
            if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
                continue
            np.testing.assert_array_equal(sync_reader.get_tensor(key),
                                          async_reader.get_tensor(key))


def test_snapshot_is_consistent_while_training_continues(tmp_path):
    model = make_model(units=32)
    x, y = make_data()
    model.fit(x, y, epochs=1, verbose=0)
    training_state = state_lib.TrainingState(model)
    snap = training_state.snapshot()
    expected = {g: [np.array(t) for t in ts] for g, ts in snap.tensors.items()}
    model.fit(x, y, epochs=1, verbose=0)  # updates every variable
    for group, tensors in snap.tensors.items():
        for tensor, value in zip(tensors, expected[group]):
            np.testing.assert_array_equal(np.asarray(tensor), value)
    assert not np.array_equal(np.asarray(model.variables[0]),
                              expected["model"][0])


def test_final_checkpoint_is_always_committed(tmp_path):
    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, save_freq=100,
                                 **ckpt_args())
    fit(model, ckpt, epochs=1)
    infos = keras_ckpt.list_checkpoints(tmp_path)
    assert [(i.step, i.epoch, i.batch) for i in infos] == [(6, 1, 0)]
    assert ckpt.last_saved.name == "ckpt-6"


def test_save_every_seconds(tmp_path):
    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.06)

    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, save_freq="epoch",
                                 save_every_seconds=0.15,
                                 **ckpt_args(max_to_keep=None))
    fit(model, ckpt, epochs=1, extra=[Slow()])
    steps = [i.step for i in keras_ckpt.list_checkpoints(tmp_path)]
    assert len(steps) >= 2 and steps[-1] == 6, steps
    assert all(s < 6 for s in steps[:-1])


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------

def test_resume_restores_everything_and_continues(tmp_path):
    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args())
    fit(model, ckpt, epochs=2)
    expected = [np.array(v) for v in model.variables + model.optimizer.variables]

    fresh = make_model(seed=99)
    ckpt2 = keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args())
    history = fit(fresh, ckpt2, epochs=2)  # already complete: trains nothing
    assert ckpt2.restored.step == 12 and ckpt2.restored.epoch == 2
    got = [np.array(v) for v in fresh.variables + fresh.optimizer.variables]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert history.epoch == [0, 1]  # the history survives the restart
    history = fit(fresh, keras_ckpt.Checkpoint(directory=tmp_path,
                                               **ckpt_args()), epochs=3)
    assert history.epoch == [0, 1, 2]
    assert int(fresh.optimizer.iterations.numpy()) == 18
    assert fresh._initial_epoch is None  # a later fit() is not affected


def test_callback_and_custom_state_survive_restart(tmp_path):
    class Counter:
        def __init__(self):
            self.count = 0
            self.table = np.zeros(3)

        def get_state(self):
            return {"count": self.count, "table": self.table}

        def set_state(self, state):
            self.count = state["count"]
            self.table = state["table"]

    class CountingCallback(keras.callbacks.Callback):
        def __init__(self, counter):
            super().__init__()
            self.counter = counter

        def on_train_batch_end(self, batch, logs=None):
            self.counter.count += 1
            self.counter.table[self.counter.count % 3] += 1

    counter = Counter()
    variable = tf.Variable(5.0)
    generator = tf.random.Generator.from_seed(7)
    stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=10)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0,
                                                min_delta=100.0)
    state = {"counter": counter, "var": variable, "gen": generator,
             "stopper": stopper, "plateau": plateau}
    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, state=state, **ckpt_args())
    fit(model, ckpt, epochs=2, extra=[CountingCallback(counter), stopper, plateau])
    variable.assign(42.0)
    generator.normal([3])  # after the save: must not leak into the restore
    saved = dict(count=counter.count, table=counter.table.copy(),
                 wait=plateau.wait, cooldown=plateau.cooldown_counter,
                 best=plateau.best, es_best=stopper.best, es_wait=stopper.wait,
                 lr=float(np.asarray(model.optimizer.learning_rate)))
    assert saved["lr"] < 0.01  # the plateau callback reduced it

    counter2 = Counter()
    variable2 = tf.Variable(0.0)
    generator2 = tf.random.Generator.from_seed(0)
    stopper2 = keras.callbacks.EarlyStopping(monitor="loss", patience=10)
    plateau2 = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0,
                                                 min_delta=100.0)
    state2 = {"counter": counter2, "var": variable2, "gen": generator2,
              "stopper": stopper2, "plateau": plateau2}
    model2 = make_model(seed=5)
    ckpt2 = keras_ckpt.Checkpoint(directory=tmp_path, state=state2,
                                  **ckpt_args())
    # The Keras callbacks come *after* the checkpoint in the list and reset
    # themselves in on_train_begin; the restored state must win.
    fit(model2, ckpt2, epochs=2, extra=[stopper2, plateau2])
    assert counter2.count == saved["count"]
    np.testing.assert_array_equal(counter2.table, saved["table"])
    assert float(variable2.numpy()) == 5.0
    assert plateau2.wait == saved["wait"] and plateau2.best == saved["best"]
    assert plateau2.cooldown_counter == saved["cooldown"]
    assert stopper2.best == saved["es_best"] and stopper2.wait == saved["es_wait"]
    assert float(np.asarray(model2.optimizer.learning_rate)) == saved["lr"]
    np.testing.assert_array_equal(
        generator2.state.numpy(),
        tf.random.Generator.from_seed(7).state.numpy())


def test_falls_back_past_a_broken_checkpoint(tmp_path, caplog):
    model = make_model()
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, save_freq=3,
                                 **ckpt_args(max_to_keep=None))
    fit(model, ckpt, epochs=1)  # ckpt-3, ckpt-6
    data = tmp_path / "ckpt-6.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-4])  # truncated by a crash
    (tmp_path / "ckpt-9.json").write_text("{not json")  # torn manifest

    with caplog.at_level(logging.WARNING, logger="keras_ckpt"):
        ckpt2 = keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args())
        fit(make_model(), ckpt2, epochs=1)
    assert ckpt2.restored.name == "ckpt-3"
    assert "ckpt-6" in caplog.text and "bytes" in caplog.text


def test_different_model_is_refused_and_nothing_changes(tmp_path):
    fit(make_model(units=8), keras_ckpt.Checkpoint(directory=tmp_path,
                                                   **ckpt_args()), epochs=1)
    before = dir_state(tmp_path)
    other = make_model(units=16)
    with pytest.raises(keras_ckpt.IncompatibleCheckpointError,
                       match=r"kernel is \(4, 16\) float32 in the model"):
        fit(other, keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args()),
            epochs=1)
    assert dir_state(tmp_path) == before


def test_resume_false_refuses_to_mix_with_existing_checkpoints(tmp_path):
    fit(make_model(), keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args()),
        epochs=1)
    before = dir_state(tmp_path)
    with pytest.raises(ValueError, match="`resume`"):
        fit(make_model(), keras_ckpt.Checkpoint(directory=tmp_path,
                                                **ckpt_args(resume=False)))
    assert dir_state(tmp_path) == before


def test_branch_from_a_checkpoint_path(tmp_path):
    model = make_model()
    fit(model, keras_ckpt.Checkpoint(directory=tmp_path / "a", save_freq=6,
                                     **ckpt_args(max_to_keep=None)), epochs=2)
    branch = keras_ckpt.Checkpoint(directory=tmp_path / "b",
                                   **ckpt_args(resume=str(tmp_path / "a" / "ckpt-6")))
    fit(make_model(seed=3), branch, epochs=2)
    assert branch.restored.step == 6
    assert [i.step for i in keras_ckpt.list_checkpoints(tmp_path / "b")] == [12]
    assert [i.step for i in keras_ckpt.list_checkpoints(tmp_path / "a")] == [6, 12]


def test_keep_best_survives_restarts(tmp_path):
    x, y = make_data()

    class FakeVal(keras.callbacks.Callback):
        """Logs a val_loss that is best at epoch 1 and worse afterwards."""

        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = [5.0, 1.0, 3.0, 4.0, 6.0, 7.0][epoch]

    args = ckpt_args(max_to_keep=1, monitor="val_loss", keep_best=1)
    model = make_model()
    fit(model, keras_ckpt.Checkpoint(directory=tmp_path, **args), epochs=3,
        extra=[FakeVal()])
    fit(model, keras_ckpt.Checkpoint(directory=tmp_path, **args), epochs=5,
        extra=[FakeVal()])
    names = [i.name for i in keras_ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt-12", "ckpt-30"]  # best (epoch 1) + latest
    best = keras_ckpt.restore(make_model(), tmp_path, checkpoint="best",
                              monitor="val_loss")
    assert best.step == 12 and best.metrics["val_loss"] == 1.0


def test_max_to_keep_and_resume_best(tmp_path):
    class FakeVal(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_mae"] = [3.0, 1.0, 2.0, 4.0][epoch]

    model = make_model()
    fit(model, keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args(
        max_to_keep=2, monitor="val_mae", keep_best=1)), epochs=4,
        extra=[FakeVal()])
    assert [i.step for i in keras_ckpt.list_checkpoints(tmp_path)] == [12, 18, 24]
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args(
        monitor="val_mae", resume="best"))
    fit(make_model(), ckpt, epochs=4, extra=[FakeVal()])
    assert ckpt.restored.step == 12


def test_full_disk_raises_and_keeps_earlier_checkpoints(small_disk):
    model = make_model(units=8)
    ckpt = keras_ckpt.Checkpoint(directory=small_disk, save_freq=1,
                                 **ckpt_args(max_to_keep=None, async_save=False))

    class Filler(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:  # after two good checkpoints, fill the disk
                with open(small_disk / "filler", "wb") as f:
                    try:
                        f.write(b"\0" * 1024 * 1024)
                    except OSError:
                        pass

    with pytest.raises(keras_ckpt.CheckpointWriteError,
                       match="No space left|Earlier checkpoints are intact"):
        fit(model, ckpt, epochs=1, extra=[Filler()])
    (small_disk / "filler").unlink()
    infos = keras_ckpt.list_checkpoints(small_disk)
    assert [i.step for i in infos] == [1, 2]
    leftovers = [p.name for p in small_disk.iterdir()
                 if p.name.startswith("ckpt-3")]
    assert leftovers == []
    keras_ckpt.restore(make_model(units=8), small_disk)  # still restorable


def test_async_write_error_surfaces_on_the_training_thread(small_disk):
    model = make_model(units=8)
    ckpt = keras_ckpt.Checkpoint(directory=small_disk, save_freq=1,
                                 **ckpt_args(max_to_keep=None, async_save=True))
    (small_disk / "filler").write_bytes(b"\0" * 200 * 1024)
    with pytest.raises(keras_ckpt.CheckpointWriteError):
        fit(model, ckpt, epochs=1)


# ---------------------------------------------------------------------------
# restore() and list_checkpoints()
# ---------------------------------------------------------------------------

def test_restore_and_list(tmp_path):
    model = make_model()
    fit(model, keras_ckpt.Checkpoint(directory=tmp_path, save_freq=4,
                                     **ckpt_args(max_to_keep=None)), epochs=2)
    infos = keras_ckpt.list_checkpoints(tmp_path)
    assert [(i.step, i.epoch, i.batch) for i in infos] == [
        (4, 0, 4), (8, 1, 2), (12, 2, 0)]
    assert all(i.complete and i.size > 0 and i.path for i in infos)

    target = make_model(seed=7)
    info = keras_ckpt.restore(target, tmp_path)
    assert info.step == 12
    for a, b in zip(model.variables + model.optimizer.variables,
                    target.variables + target.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    by_step = make_model(seed=7)
    assert keras_ckpt.restore(by_step, tmp_path, checkpoint=8).step == 8
    assert keras_ckpt.restore(by_step, str(tmp_path / "ckpt-4")).step == 4

    uncompiled = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                   keras.layers.Dropout(0.2),
                                   keras.layers.Dense(1)])
    keras_ckpt.restore(uncompiled, tmp_path, optimizer=False)
    np.testing.assert_array_equal(np.asarray(uncompiled.layers[0].kernel),
                                  np.asarray(model.layers[0].kernel))

    with pytest.raises(keras_ckpt.CheckpointNotFoundError, match="step 5"):
        keras_ckpt.restore(by_step, tmp_path, checkpoint=5)
    with pytest.raises(keras_ckpt.CheckpointNotFoundError):
        keras_ckpt.restore(by_step, tmp_path / "nothing-here")


def test_restore_detects_corruption(tmp_path):
    fit(make_model(), keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args()),
        epochs=1)
    data = tmp_path / "ckpt-6.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, wrong bytes
    data.write_bytes(bytes(raw))
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="CRC32C"):
        keras_ckpt.restore(make_model(), tmp_path)


def test_manifest_json_is_plain(tmp_path):
    fit(make_model(), keras_ckpt.Checkpoint(directory=tmp_path, **ckpt_args()),
        epochs=1)
    data = json.loads((tmp_path / "ckpt-6.json").read_text())
    assert data["format"] == "keras_ckpt/1"
    assert set(data["files"]) == {"ckpt-6.data-00000-of-00001", "ckpt-6.index"}


def test_a_plain_path_mirror_is_a_file_mirror(tmp_path):
    ckpt = keras_ckpt.Checkpoint(directory=tmp_path / "local",
                                 mirror=tmp_path / "mirror", **ckpt_args())
    fit(make_model(), ckpt, epochs=1)
    assert [i.step for i in keras_ckpt.list_checkpoints(
        f"file://{tmp_path}/mirror")] == [6]
