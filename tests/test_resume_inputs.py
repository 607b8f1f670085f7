"""Resume in-process: input forms, warnings, models built without `built`.

The bitwise end-to-end comparisons (SIGKILL + rerun) are in
test_everyday_jobs.py; these tests check what a user sees at fit start and
the pieces that make those comparisons pass.
"""

import importlib.util
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ckpt
from keras_ckpt.engine import state as state_lib
from keras_ckpt.callbacks import checkpoint as checkpoint_lib

_spec = importlib.util.spec_from_file_location(
    "everyday", os.path.join(os.path.dirname(__file__), "scripts",
                             "everyday.py"))
everyday = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(everyday)

INEXACT = "cannot guarantee an exact resume"


def _fit(model, x, ckpt, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, callbacks=[ckpt], verbose=0, **kwargs)
    return history, [str(w.message) for w in caught if INEXACT in str(w.message)]


def _ckpt(tmp_path, **kwargs):
    return keras_ckpt.Checkpoint(
        directory=str(tmp_path / "ckpt"), save_freq=2, async_save=False,
        on_preemption=None, verbose=0, **kwargs)


def _data():
    return everyday.data()


def test_unseeded_tf_data_shuffle_warns_at_fit_start(tmp_path):
    tf.random.set_seed(None)
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(16).batch(8)
    _, warned = _fit(everyday.dense_model(), ds, _ckpt(tmp_path), epochs=1)
    assert len(warned) == 1
    assert "`shuffle` without a seed" in warned[0] and "seed=" in warned[0]


def test_seeded_shuffle_and_pydataset_do_not_warn(tmp_path):
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(16, seed=1).batch(8)
    _, warned = _fit(everyday.dense_model(), ds, _ckpt(tmp_path), epochs=2)
    _, warned_again = _fit(everyday.dense_model(), ds, _ckpt(tmp_path),
                           epochs=3)
    _, warned_py = _fit(everyday.dense_model(), everyday.Batches(x, y),
                        _ckpt(tmp_path / "py"), epochs=1)
    assert warned == warned_again == warned_py == []


def test_generator_resume_warns_that_its_order_is_replayed(tmp_path):
    x, y = _data()

    def batches():
        for i in range(10 ** 6):
            j = (i * 8) % (len(x) - 8)
            yield x[j:j + 8], y[j:j + 8]

    _, warned = _fit(everyday.dense_model(), batches(), _ckpt(tmp_path),
                     steps_per_epoch=3, epochs=1)
    assert warned == []  # nothing to replay on a fresh start
    history, warned = _fit(everyday.dense_model(), batches(), _ckpt(tmp_path),
                           steps_per_epoch=3, epochs=2)
    assert len(warned) == 1 and "Python generator" in warned[0]
    assert "first 3 batches" in warned[0] and "PyDataset" in warned[0]
    assert history.epoch == [0, 1]


def _gan():
    keras.utils.set_random_seed(3)
    model = everyday.GAN()
    d_opt, g_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(2e-3)
    d_opt.build(model.discriminator.trainable_variables)
    g_opt.build(model.generator.trainable_variables)
    model.compile(d_opt, g_opt)
    return model


def test_subclassed_model_with_two_optimizers_resumes_both(tmp_path):
    x, _ = _data()
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    first = _gan()
    assert not first.built  # every variable exists, the flag says otherwise
    _fit(first, ds, _ckpt(tmp_path), epochs=1)
    second = _gan()
    _fit(second, ds, _ckpt(tmp_path), epochs=2)
    # Both optimizers continued from the checkpoint: 2 epochs of 6 steps.
    assert int(second.d_optimizer.iterations.numpy()) == 12
    assert int(second.g_optimizer.iterations.numpy()) == 12
    assert second.history.epoch == [0, 1]


def test_unbuilt_attribute_optimizers_are_built_by_tracing_train_step(
        tmp_path):
    # Optimizers created by their first apply_gradients inside train_step
    # are built before the restore by tracing train_step (nothing runs).
    x, _ = _data()
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    _fit(_gan(), ds, _ckpt(tmp_path), epochs=1)
    keras.utils.set_random_seed(3)
    model = everyday.GAN()
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(2e-3))
    assert not model.d_optimizer.built
    _fit(model, ds, _ckpt(tmp_path), epochs=2)
    assert int(model.d_optimizer.iterations.numpy()) == 12
    assert int(model.g_optimizer.iterations.numpy()) == 12


class _EagerOnlyGAN(everyday.GAN):
    def train_step(self, real):
        if float(tf.reduce_sum(real)) < -1e30:  # needs a concrete value
            raise AssertionError("unreachable")
        return super().train_step(real)


def test_untraceable_train_step_with_unbuilt_optimizer_is_refused(tmp_path):
    x, _ = _data()
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    _fit(_gan(), ds, _ckpt(tmp_path), epochs=1)
    model = _EagerOnlyGAN()
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(2e-3))
    model.run_eagerly = True
    with pytest.raises(ValueError, match=r"`model\.d_optimizer` is not built"
                       r"(.|\n)*tracing its train_step failed"):
        model.fit(ds, epochs=2, verbose=0, callbacks=[_ckpt(tmp_path)])


def test_csv_rows_of_resumed_epochs_are_dropped_byte_for_byte(tmp_path):
    path = tmp_path / "log.csv"
    text = ('epoch,loss,val_loss\r\n0,0.5,"[1, 2]"\r\n1,0.4,0.3\r\n'
            '2,0.3,0.2\r\n')
    path.write_text(text, newline="")
    checkpoint_lib._drop_rows_from(str(path), ",", 2)
    assert path.read_bytes() == text.rsplit("2,0.3", 1)[0].encode()
    checkpoint_lib._drop_rows_from(str(path), ",", 0)
    assert path.read_bytes() == b"epoch,loss,val_loss\r\n"


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_step):
        super().__init__()
        self.at_step, self.steps = at_step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at_step:
            raise RuntimeError("crash")


def test_checkpoint_without_data_position_still_resumes_exactly(
        tmp_path, monkeypatch):
    """A mid-epoch checkpoint of an older keras_ckpt (no data position):
    the epoch's trained batches are drawn again, as before."""
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def model():
        keras.utils.set_random_seed(5)
        return everyday.dense_model()

    reference = model()
    reference.fit(ds, epochs=2, verbose=0)
    with monkeypatch.context() as patch:
        patch.setattr(state_lib.DataPosition, "get_state",
                      lambda self, batch: None)
        with pytest.raises(RuntimeError, match="crash"):
            model().fit(ds, epochs=2, verbose=0,
                        callbacks=[_ckpt(tmp_path), _Crash(9)])
    resumed = model()
    ckpt = _ckpt(tmp_path)
    resumed.fit(ds, epochs=2, verbose=0, callbacks=[ckpt])
    assert (ckpt.restored.epoch, ckpt.restored.batch) == (1, 2)
    for a, b in zip(reference.variables, resumed.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
