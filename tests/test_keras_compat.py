"""Every Keras/TF internal keras_ckpt touches still behaves as it relies on.

One test per function of `keras_ckpt._keras_compat`: when an upgrade of Keras
or TensorFlow renames or changes one of these internals, the matching test
fails here, naming it, instead of a resume going silently wrong.
"""

import os
import random
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ckpt import _keras_compat as compat


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    return model


def _data(n=12):
    x = np.arange(n * 3, dtype="float32").reshape(n, 3) / 10
    return x, x.sum(axis=1, keepdims=True)


class _Probe(keras.callbacks.Callback):
    def __init__(self, on_begin=None):
        super().__init__()
        self.on_begin = on_begin
        self.batches = []
        self.callback_list = None

    def set_model(self, model):
        super().set_model(model)
        self.callback_list = compat.calling_callback_list()

    def on_train_begin(self, logs=None):
        if self.on_begin is not None:
            self.on_begin(compat.running_epoch_iterator())

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(batch)


def test_calling_callback_list_is_fits_list():
    probe = _Probe()
    _model().fit(*_data(), batch_size=4, epochs=1, verbose=0,
                 callbacks=[probe])
    assert isinstance(probe.callback_list, keras.callbacks.CallbackList)
    assert probe in probe.callback_list.callbacks
    assert compat.calling_callback_list() is None  # not from a hook


def test_running_epoch_iterator_and_wrapping_hides_steps():
    seen = {}

    def drop_first_step(enumerate_epoch):
        for begin, end, iterator in enumerate_epoch:
            if begin == 0:
                next(iterator)  # consumed, never trained, never reported
                continue
            yield begin, end, iterator

    def on_begin(epoch_iterator):
        seen["iterator"] = epoch_iterator
        compat.wrap_epoch_batches(epoch_iterator, drop_first_step)

    probe = _Probe(on_begin)
    model = _model()
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0, callbacks=[probe])
    assert seen["iterator"] is not None
    assert probe.batches == [1, 2]  # step 0 hidden from every callback
    assert int(model.optimizer.iterations.numpy()) == 2
    compat.unwrap_epoch_batches(seen["iterator"])
    assert "_enumerate_iterator" not in vars(seen["iterator"])


def test_watch_iterator_creation_counts_what_fit_creates():
    created = []

    def on_begin(epoch_iterator):
        compat.watch_iterator_creation(epoch_iterator, created.append)
        compat.create_data_iterator(epoch_iterator)  # counted too

    ds = tf.data.Dataset.from_tensor_slices(_data()).batch(4)
    _model().fit(ds, epochs=2, verbose=0, callbacks=[_Probe(on_begin)])
    # Keras creates one iterator per epoch plus one when an epoch used up a
    # finite input: a reshuffling shuffle's seed advances with each.
    assert len(created) == 1 + 2 * 2
    assert all(isinstance(i, tf.data.Iterator) for i in created)


def test_current_data_iterator_persists_with_steps_per_epoch():
    seen = []

    def record(enumerate_epoch):
        for step in enumerate_epoch:
            seen.append(step[2])
            yield step

    found = {}

    def on_begin(epoch_iterator):
        found["iterator"] = epoch_iterator
        compat.wrap_epoch_batches(epoch_iterator, record)

    ds = tf.data.Dataset.from_tensor_slices(_data()).repeat().batch(4)
    _model().fit(ds, steps_per_epoch=2, epochs=2, verbose=0,
                 callbacks=[_Probe(on_begin)])
    assert len({id(i) for i in seen}) == 1  # one iterator across epochs
    assert compat.current_data_iterator(found["iterator"]) is seen[-1]


def test_input_kind_and_user_dataset():
    kinds = {}
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]

    def gen():
        while True:
            yield x[:4], y[:4]

    inputs = {"arrays": dict(x=x, y=y, batch_size=4),
              "tf.data": dict(x=ds),
              "py_dataset": dict(x=Batches()),
              "generator": dict(x=gen(), steps_per_epoch=2)}
    for name, fit in inputs.items():
        def on_begin(epoch_iterator, name=name):
            kinds[name] = (compat.input_kind(epoch_iterator),
                           compat.user_dataset(epoch_iterator))
        _model().fit(epochs=1, verbose=0, callbacks=[_Probe(on_begin)], **fit)
    assert {k: v[0] for k, v in kinds.items()} == {k: k for k in inputs}
    assert kinds["tf.data"][1] is ds
    assert kinds["arrays"][1] is None


def test_dataset_shuffles_reads_seed_and_reshuffle():
    base = tf.data.Dataset.range(8)
    assert compat.dataset_shuffles(base.batch(2)) == []
    assert compat.dataset_shuffles(base.shuffle(8, seed=3).batch(2)) == [
        (True, True)]
    assert compat.dataset_shuffles(
        base.shuffle(8, seed=3, reshuffle_each_iteration=False)) == [
        (True, False)]
    code = textwrap.dedent("""
        import tensorflow as tf
        from keras_ckpt import _keras_compat as compat
        print(compat.dataset_shuffles(tf.data.Dataset.range(8).shuffle(8)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[(False, True)]", (
        result.stderr[-2000:])


def test_save_and_restore_iterator_continue_the_same_order():
    ds = tf.data.Dataset.range(40).shuffle(10, seed=1).map(
        lambda v: v * 2).batch(4)
    iterator = iter(ds)
    for _ in range(3):
        next(iterator)
    state = compat.save_iterator(iterator)
    assert isinstance(state, bytes) and state
    expected = [next(iterator).numpy().tolist() for _ in range(3)]
    fresh = iter(ds)
    compat.restore_iterator(fresh, state)
    assert [next(fresh).numpy().tolist() for _ in range(3)] == expected
    assert compat.save_iterator(iter([1, 2])) is None


def test_build_compiled_metrics_creates_metric_variables():
    model = _model()
    assert not model._compile_metrics.built
    batch = compat.zeros_like_spec(
        tf.data.Dataset.from_tensor_slices(_data()).batch(4).element_spec)
    assert [tuple(t.shape) for t in batch] == [(1, 3), (1, 1)]
    assert compat.build_compiled_metrics(model, batch)
    assert len(model.metrics_variables) >= 2


def test_replica_components_of_a_mirrored_metric():
    variable = keras.Variable(1.0)
    assert compat.replica_components(variable) is None
    code = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from keras_ckpt import _keras_compat as compat
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            metric = keras.metrics.Mean()
        total = metric.variables[0]
        parts = compat.replica_components(total)
        parts[0].assign(1.5)
        parts[1].assign(2.25)
        print(len(parts), float(total.numpy()))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "2 3.75", (
        result.stderr[-2000:])


def test_replace_train_function():
    model = _model()
    model.make_train_function()
    original = model.train_function
    replaced = compat.replace_train_function(model, lambda it: {})
    assert replaced is original and model.train_function is not original


def test_set_tensorboard_step_numbers_the_next_batch(tmp_path):
    board = keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")
    model = _model()
    board.set_model(model)
    board.on_train_begin()
    compat.set_tensorboard_step(board, 41)
    board.on_train_batch_begin(0)
    board.on_train_batch_end(0, {"loss": 0.5})
    compat.flush_tensorboard(board)
    steps = []
    for path in (tmp_path / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value
                      if v.tag == "batch_loss"]
    assert steps == [42]
    board.on_train_end()


def test_global_rng_states_round_trip():
    states = compat.global_rng_states()
    expected = (random.random(), float(np.random.rand()))
    compat.set_global_rng_states(states)
    assert (random.random(), float(np.random.rand())) == expected
    assert states["python"].dtype == np.uint32


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_fit_loop_names_keras_ckpt_relies_on():
    # The names the functions above read, in one place: a rename fails here.
    from keras.src.backend.tensorflow import trainer
    from keras.src.trainers import epoch_iterator

    fit = trainer.TensorFlowTrainer.fit
    fit = getattr(fit, "__wrapped__", fit)  # Keras' traceback filter
    assert "epoch_iterator" in fit.__code__.co_varnames
    assert hasattr(epoch_iterator.EpochIterator, "_enumerate_iterator")
    board = keras.callbacks.TensorBoard()
    assert hasattr(board, "_global_train_batch") and hasattr(board, "_writers")
