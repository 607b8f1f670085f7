"""A newcomer's first hour: an honest "best", Keras-style argument checks,
Ctrl-C that keeps the current batch, quiet logs in Keras' epoch numbers, and
the save cost in `Checkpoint.stats` and TensorBoard."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ckpt
from keras_ckpt import _keras_compat
from keras_ckpt.errors import CheckpointNotFoundError
from keras_ckpt.errors import IncompatibleCheckpointError

STEPS = 5  # batches per epoch: 40 samples, batch_size 8


def make_model(seed=0, optimizer="sgd"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.Dense(1)])
    model.compile(optimizer, "mse")
    return model


def data():
    x = np.random.RandomState(0).rand(40, 3).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


class LogScore(keras.callbacks.Callback):
    """Logs `val_score` at each epoch end from a fixed list (best: epoch 1)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_score"] = self.values[epoch]


class CountBatches(keras.callbacks.Callback):
    batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def fit(model, callbacks, epochs=3, verbose=0):
    x, y = data()
    return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False,
                     verbose=verbose, callbacks=callbacks)


# --- an honest best --------------------------------------------------------


def test_best_is_the_epoch_that_logged_the_best_validation_metric(tmp_path):
    # save_freq=3 never lands on an epoch end (5 batches per epoch): only
    # the epoch-end saves that `monitor` adds carry val_score.
    ckpt = keras_ckpt.Checkpoint(tmp_path / "ckpts", save_freq=3,
                                 monitor="val_score", mode="min", keep_best=1,
                                 max_to_keep=2, verbose=0)
    export = keras_ckpt.ExportSavedModel(tmp_path / "export", source="best",
                                         layout="plain", verbose=0)
    model = make_model()
    fit(model, [LogScore([0.1, 0.5, 0.9]), ckpt, export])
    infos = keras_ckpt.list_checkpoints(tmp_path / "ckpts")
    with_score = {i.step: i.metrics["val_score"] for i in infos
                  if "val_score" in i.metrics}
    assert with_score[STEPS] == pytest.approx(0.1)  # kept as the best
    assert export.exported.step == STEPS
    assert export.exported.metrics["val_score"] == pytest.approx(0.1)
    # The SavedModel serves the weights of the end of epoch 1, not the final.
    reference = make_model(seed=3)
    keras_ckpt.restore(reference, tmp_path / "ckpts", checkpoint=STEPS,
                       optimizer=False)
    served = tf.saved_model.load(str(tmp_path / "export" / "1"))
    x = data()[0][:4]
    np.testing.assert_allclose(served.serve(x), reference.predict(x, verbose=0),
                               rtol=1e-6)
    assert not np.allclose(served.serve(x), model.predict(x, verbose=0))


def test_save_on_epoch_end_adds_epoch_end_saves_to_save_freq(tmp_path):
    ckpt = keras_ckpt.Checkpoint(tmp_path / "ckpts", save_freq=3,
                                 save_on_epoch_end=True, max_to_keep=None,
                                 verbose=0)
    fit(make_model(), [ckpt], epochs=2)
    steps = [i.step for i in keras_ckpt.list_checkpoints(tmp_path / "ckpts")]
    assert steps == [3, 5, 8, 10]  # N batches after the last save
    plain = keras_ckpt.Checkpoint(tmp_path / "plain", save_freq=3,
                                  max_to_keep=None, verbose=0)
    fit(make_model(), [plain], epochs=2)
    steps = [i.step for i in keras_ckpt.list_checkpoints(tmp_path / "plain")]
    assert steps == [3, 6, 9, 10]  # and the final one


def test_unlogged_monitor_warns_like_keras_with_the_logged_names(tmp_path):
    ckpt = keras_ckpt.Checkpoint(tmp_path / "ckpts", monitor="val_los",
                                 verbose=0)
    x, y = data()
    with pytest.warns(UserWarning) as record:
        make_model().fit(x, y, epochs=2, verbose=0, validation_split=0.2,
                         callbacks=[ckpt])
    messages = [str(w.message) for w in record if "val_los`" in str(w.message)]
    assert len(messages) == 1  # once, not at every epoch
    assert 'Did you mean "val_loss"?' in messages[0]
    assert "Available metrics are: loss,val_loss" in messages[0]


def test_resume_best_without_the_metric_lists_the_logged_ones(tmp_path):
    fit(make_model(), [keras_ckpt.Checkpoint(tmp_path / "c", verbose=0)], 1)
    again = keras_ckpt.Checkpoint(tmp_path / "c", monitor="val_loss",
                                  resume="best", verbose=0)
    with pytest.raises(CheckpointNotFoundError,
                       match="'val_loss'; the metrics they logged: loss"):
        fit(make_model(), [again], epochs=2)


# --- arguments checked where they are given ---------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(resume="lastest"), 'resume=\'lastest\'. Did you mean "latest"?'),
    (dict(resume="bset"), 'Did you mean "best"?'),
    (dict(mode="mni"), 'mode=\'mni\'. Did you mean "min"?'),
    (dict(when_busy="skp"), 'Did you mean "skip"?'),
    (dict(on_preemption="Exit"), 'Did you mean "exit"?'),
    (dict(save_on_epoch_end="yes"), "save_on_epoch_end='yes'"),
    (dict(save_on_interrupt=None), "Expected True or False"),
    (dict(verbose="loud"), "verbose='loud'"),
])
def test_checkpoint_arguments_get_keras_style_errors(tmp_path, kwargs,
                                                     message):
    with pytest.raises(ValueError, match="Invalid value for argument") as e:
        keras_ckpt.Checkpoint(tmp_path / "c", **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("typo, fixed", [
    ("s3:/my-bucket/run-1", "s3://my-bucket/run-1"),
    ("gs:my-bucket/run-1", "gs://my-bucket/run-1"),
    ("az:/container/run-1", "az://container/run-1"),
])
def test_a_mistyped_mirror_url_is_refused_with_the_fix(tmp_path, monkeypatch,
                                                       capsys, typo, fixed):
    """`mirror="s3:/my-bucket/run-1"` was taken as a local path and failed
    at fit as a missing `file:///.../s3:/my-bucket/run-1` directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="argument `mirror`") as e:
        keras_ckpt.Checkpoint(tmp_path / "c", mirror=typo)
    assert f'Did you mean "{fixed}"?' in str(e.value)
    # The CLI: a usage error with the same suggestion, nothing created.
    from keras_ckpt import cli

    assert cli.main(["ls", typo]) == 2
    assert f'Did you mean "{fixed}"?' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_an_existing_path_is_a_branch_source_not_a_typo(tmp_path,
                                                        monkeypatch):
    fit(make_model(), [keras_ckpt.Checkpoint(tmp_path / "lastest",
                                             verbose=0)], 1)
    monkeypatch.chdir(tmp_path)
    ckpt = keras_ckpt.Checkpoint(tmp_path / "new", resume="lastest",
                                 verbose=0)
    fit(make_model(), [ckpt], epochs=2)
    assert ckpt.restored.step == STEPS


def test_export_best_without_monitor_fails_before_the_first_batch(tmp_path):
    counter = CountBatches()
    export = keras_ckpt.ExportSavedModel(tmp_path / "e", source="best",
                                         verbose=0)
    for callbacks in ([export, counter],
                      [keras_ckpt.Checkpoint(tmp_path / "c", verbose=0),
                       export, counter]):
        with pytest.raises(ValueError, match='source="best"\\) needs a '
                           "keras_ckpt.Checkpoint callback with `monitor`"):
            fit(make_model(), callbacks)
    assert counter.batches == 0
    with pytest.raises(ValueError, match='Did you mean "best"'):
        keras_ckpt.ExportSavedModel(source="bets")


def test_stateful_callbacks_left_out_of_state_get_one_warning(tmp_path):
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss")
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=5)
    ckpt = keras_ckpt.Checkpoint(tmp_path / "c", verbose=0,
                                 state={"plateau": plateau})
    with pytest.warns(UserWarning, match="EarlyStopping in fit\\(\\)'s "
                      "callbacks is not in `state=`") as record:
        fit(make_model(), [ckpt, plateau, stop], epochs=1)
    assert not any("ReduceLROnPlateau" in str(w.message) for w in record)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ckpt = keras_ckpt.Checkpoint(tmp_path / "d", verbose=0,
                                     state={"plateau": plateau, "stop": stop})
        fit(make_model(), [ckpt, plateau, stop], epochs=1)
    assert not any("state=" in str(w.message) for w in record)


def test_sibling_callbacks_are_the_fit_callback_list():
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.extend(_keras_compat.sibling_callbacks(self))

    probe, other = Probe(), CountBatches()
    fit(make_model(), [probe, other], epochs=1)
    assert probe in seen and other in seen  # fails if Keras changes its loop


def test_restore_with_another_optimizer_suggests_optimizer_false(tmp_path):
    fit(make_model(), [keras_ckpt.Checkpoint(tmp_path / "c", verbose=0)], 1)
    other = make_model(optimizer="adam")
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"restore\(\.\.\., optimizer=False\)"):
        keras_ckpt.restore(other, tmp_path / "c")
    info = keras_ckpt.restore(other, tmp_path / "c", optimizer=False)
    assert info.step == STEPS


# --- logs --------------------------------------------------------------------


def test_logs_follow_fit_verbose_and_keras_epoch_numbers(tmp_path, capsys):
    fit(make_model(), [keras_ckpt.Checkpoint(tmp_path / "a", resume=False)],
        epochs=2, verbose=0)
    assert capsys.readouterr().out == ""  # verbose="auto" follows fit
    fit(make_model(), [keras_ckpt.Checkpoint(tmp_path / "b", verbose=1,
                                             resume=False)],
        epochs=2, verbose=0)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.strip() for line in lines)  # no blank lines
    assert any("saved ckpt-5 (end of epoch 1/2" in line for line in lines)
    assert any("saved ckpt-10 (end of epoch 2/2" in line for line in lines)
    assert not any("resume" in line for line in lines)
    assert any(" KiB)" in line or " B)" in line for line in lines)


def test_save_lines_are_printed_between_progress_bars(tmp_path, capsys):
    ckpt = keras_ckpt.Checkpoint(tmp_path / "c", save_freq=2)
    fit(make_model(), [ckpt], epochs=2, verbose=1)
    out = capsys.readouterr().out
    # Each line starts with Keras' "Epoch N/M", a bar, or ours: never a save
    # line glued into a bar.
    for line in out.splitlines():
        text = line.split("\r")[-1]
        assert "keras_ckpt" not in text or text.startswith("keras_ckpt"), line
    assert out.index("saved ckpt-2 (epoch 1/2, batch 2") < out.index(
        "Epoch 2/2")


# --- the save cost -----------------------------------------------------------


def test_stats_and_tensorboard_scalars(tmp_path):
    logs = tmp_path / "logs"
    ckpt = keras_ckpt.Checkpoint(tmp_path / "c", save_freq=2,
                                 mirror=str(tmp_path / "mirror"),
                                 max_to_keep=None, verbose=0)
    fit(make_model(), [ckpt, keras.callbacks.TensorBoard(str(logs))],
        epochs=2)
    infos = keras_ckpt.list_checkpoints(tmp_path / "c")
    assert [s.step for s in ckpt.stats] == [i.step for i in infos]
    for record in ckpt.stats:
        assert record.bytes > 0 and record.blocking_seconds > 0
        assert record.write_seconds > 0 and record.upload_seconds > 0
        assert record.mirror_lag_seconds >= record.upload_seconds
    scalars = {}
    for path in glob.glob(str(logs / "train" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("keras_ckpt/"):
                    number = tf.make_ndarray(value.tensor)
                    scalars.setdefault(value.tag, {})[event.step] = number
    assert set(scalars) == {
        "keras_ckpt/save_blocking_seconds", "keras_ckpt/save_write_seconds",
        "keras_ckpt/save_bytes", "keras_ckpt/save_upload_seconds",
        "keras_ckpt/mirror_lag_seconds"}
    assert scalars["keras_ckpt/save_bytes"] == {
        s.step: pytest.approx(s.bytes) for s in ckpt.stats}


# --- Ctrl-C --------------------------------------------------------------------

_INTERRUPTED_JOB = textwrap.dedent("""
    import sys, time
    import keras, numpy as np
    import keras_ckpt

    class Announce(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print("batch", batch + 1, flush=True)
            time.sleep(0.3)  # a slow step, so that SIGINT lands mid-epoch

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((400, 3), "float32")
    ckpt = keras_ckpt.Checkpoint(sys.argv[1], save_freq=1000, verbose=1)
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0,
              callbacks=[ckpt, Announce()])
""")


@pytest.mark.slow
def test_ctrl_c_commits_the_current_batch(tmp_path, subprocess_env):
    directory = str(tmp_path / "ckpts")
    # SIGINT as in a terminal: a suite started in the background (nohup,
    # `make test &`) ignores it, and its children would inherit that.
    process = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_JOB, directory],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.strip() == "batch 3":
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "KeyboardInterrupt" in err
    assert "saving the current batch" in err
    infos = keras_ckpt.list_checkpoints(directory)
    assert len(infos) == 1 and 3 <= infos[0].step < 50
    assert f"committed {infos[0].name}" in out
    # fit() resumes right after the interrupted batch.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    ckpt = keras_ckpt.Checkpoint(directory, save_freq=1000, verbose=0)
    x = np.ones((400, 3), "float32")
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0,
              callbacks=[ckpt])
    assert ckpt.restored.step == infos[0].step
    # Trained on the 50 batches of the epoch once: none twice, none lost.
    assert int(model.optimizer.iterations.numpy()) == 50


# --- load_model ------------------------------------------------------------------


class Scale(keras.layers.Layer):
    """A custom layer known only through `custom_objects`."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return x * self.scale


@keras.saving.register_keras_serializable(package="NewcomerTest")
class Shift(keras.layers.Layer):
    def build(self, input_shape):
        self.shift = self.add_weight(shape=(), initializer="zeros")

    def call(self, x):
        return x + self.shift


def test_load_model_rebuilds_and_restores_without_the_script(tmp_path, s3_url):
    model = keras.Sequential([keras.Input((3,)), Scale(), Shift(),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
    ckpt = keras_ckpt.Checkpoint(tmp_path / "c", mirror=s3_url, verbose=0)
    fit(model, [ckpt], epochs=2)
    x = data()[0][:4]
    expected = model.predict(x, verbose=0)

    for source in (tmp_path / "c", s3_url):
        loaded = keras_ckpt.load_model(source,
                                       custom_objects={"Scale": Scale})
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
        assert int(loaded.optimizer.iterations.numpy()) == 2 * STEPS
        assert loaded.loss == "mse"
        loaded.fit(*data(), batch_size=8, epochs=1, verbose=0)  # fine-tunes

    first = keras_ckpt.load_model(f"{s3_url}/ckpt-{STEPS}", compile=False,
                                  custom_objects={"Scale": Scale})
    assert getattr(first, "optimizer", None) is None
    assert not np.array_equal(first.predict(x, verbose=0), expected)

    with pytest.raises(keras_ckpt.KerasCkptError,
                       match="Scale.*pass them in `custom_objects`"):
        keras_ckpt.load_model(tmp_path / "c")
    with pytest.raises(ValueError, match='checkpoint="best" needs `monitor`'):
        keras_ckpt.load_model(tmp_path / "c", checkpoint="best")
