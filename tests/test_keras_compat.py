"""Every Keras/TF internal keras_ckpt touches still behaves as it relies on.

One test per function of `keras_ckpt._keras_compat`: when an upgrade of Keras
or TensorFlow renames or changes one of these internals, the matching test
fails here, naming it, instead of a resume going silently wrong.
"""

import ast
import importlib.util
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


# ---------------------------------------------------------------------------
# Which Keras (tf_keras shims).
# ---------------------------------------------------------------------------


def test_uses_legacy_keras_reads_tensorflows_switch():
    assert compat.uses_legacy_keras({"TF_USE_LEGACY_KERAS": "1"})
    assert not compat.uses_legacy_keras({"TF_USE_LEGACY_KERAS": "0"})
    assert not compat.uses_legacy_keras({})
    assert issubclass(compat.Callback, keras.callbacks.Callback) or (
        compat.tf_keras is not None), "Callback is neither Keras 3's nor tf_keras'"
    assert keras.callbacks.Callback in compat.CALLBACK_TYPES


def test_callback_state_fields_exist_on_keras_callbacks():
    fields = compat.callback_state_fields()
    model = _model()
    for cls in (keras.callbacks.EarlyStopping,
                keras.callbacks.ReduceLROnPlateau):
        callback = cls(monitor="loss")
        callback.set_model(model)
        callback.on_train_begin()
        missing = [f for f in fields[cls] if not hasattr(callback, f)]
        assert not missing, (
            f"keras.callbacks.{cls.__name__} no longer has {missing}: its "
            "state would not be saved")
    checkpoint = keras.callbacks.ModelCheckpoint("/tmp/unused.keras")
    missing = [f for f in fields[keras.callbacks.ModelCheckpoint]
               if not hasattr(checkpoint, f)]
    assert not missing, (
        f"keras.callbacks.ModelCheckpoint no longer has {missing} (private "
        "attributes keras_ckpt saves)")
    assert keras.callbacks.TerminateOnNaN in compat.stateless_callbacks()


def test_is_legacy_model_and_optimizer_built():
    model = _model()
    assert not compat.is_legacy_model(model)
    optimizer = keras.optimizers.Adam()
    assert compat.optimizer_built(optimizer) is False
    optimizer.build(model.trainable_variables)
    assert compat.optimizer_built(optimizer) is True, (
        "keras.optimizers.Optimizer.built no longer says it was built")


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_optimizer_learning_rate_is_the_variable_keras_lists():
    optimizer = keras.optimizers.SGD(0.25)
    optimizer.build(_model().trainable_variables)
    learning_rate = compat.optimizer_learning_rate(optimizer)
    assert isinstance(learning_rate, keras.Variable), (
        "Optimizer._learning_rate is no longer the learning-rate variable")
    assert any(v is learning_rate for v in optimizer.variables)
    assert float(learning_rate.numpy()) == 0.25


def test_steps_per_execution():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=3)
    assert compat.steps_per_execution(model) == 3, (
        "model.steps_per_execution no longer holds the compile() value")
    assert compat.steps_per_execution(_model()) == 1


# ---------------------------------------------------------------------------
# Where fit starts; building an unbuilt model; global RNGs.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_set_initial_epoch_makes_fit_start_there():
    epochs = []

    class StartAt(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            compat.set_initial_epoch(self.model, 2)

        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    model = _model()
    model.fit(*_data(), batch_size=4, epochs=4, verbose=0,
              callbacks=[StartAt()])
    assert epochs == [2, 3], (
        "Keras' fit no longer reads model._initial_epoch after on_train_begin")
    compat.clear_initial_epoch(model)
    assert model._initial_epoch is None


class UnbuiltModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_build_from_input_creates_every_variable_before_training():
    found = {}

    def on_begin(epoch_iterator):
        model = probe.model
        found["unbuilt"] = compat.model_unbuilt(model)
        compat.build_from_input(model, epoch_iterator)
        found["variables"] = len(model.variables)
        found["optimizer"] = compat.optimizer_built(model.optimizer)
        found["iterations"] = int(model.optimizer.iterations.numpy())

    model = UnbuiltModel()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    probe = _Probe(on_begin)
    ds = tf.data.Dataset.from_tensor_slices(_data()).batch(4)
    model.fit(ds, epochs=1, verbose=0, callbacks=[probe])
    assert found["unbuilt"], (
        "Keras' fit builds a model never called before on_train_begin now: "
        "build_from_input is no longer needed")
    assert found["variables"] == 2 and found["optimizer"], (
        "Trainer._symbolic_build no longer builds the model and optimizer")
    assert found["iterations"] == 0  # nothing trained
    assert probe.batches == [0, 1, 2]


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_trace_train_step_builds_lazy_optimizers_without_running():
    found = {}

    class TwoOptimizers(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.extra = keras.optimizers.SGD(0.1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self(x) - y) ** 2)
            grads = tape.gradient(loss, self.trainable_variables)
            self.extra.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    def on_begin(epoch_iterator):
        model = probe.model
        before = [v.numpy().copy() for v in model.variables]
        compat.trace_train_step(model, epoch_iterator)
        found["built"] = compat.optimizer_built(model.extra)
        found["unchanged"] = all(
            np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
        found["iterations"] = int(model.extra.iterations.numpy())

    model = TwoOptimizers()
    model.compile(optimizer="sgd")
    probe = _Probe(on_begin)
    ds = tf.data.Dataset.from_tensor_slices(_data()).batch(4)
    model.fit(ds, epochs=1, verbose=0, callbacks=[probe])
    assert found == {"built": True, "unchanged": True, "iterations": 0}, (
        "tracing Model.train_step in a tf.function no longer creates the "
        f"optimizer's slots (in an init_scope) without running it: {found}")
    assert int(model.extra.iterations.numpy()) == 3  # fit still trains


@pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                    reason="Keras 3 only")
def test_failed_build_from_input_leaves_no_name_scope_behind():
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    # Keras' DCGAN pattern (no call()), its class named with a leading "_":
    # Keras 3.15 pushes the model's name scope, then fails on it.
    spec = importlib.util.spec_from_file_location(
        "everyday", os.path.join(os.path.dirname(__file__), "scripts",
                                 "everyday.py"))
    everyday = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(everyday)
    class _PrivateGAN(everyday.GAN):  # "__private_gan": no valid scope name
        pass

    model = _PrivateGAN()
    model.compile(keras.optimizers.Adam(), keras.optimizers.Adam())
    epoch_iterator = TFEpochIterator(
        x=tf.data.Dataset.from_tensor_slices(everyday.data()[0]).batch(8),
        distribute_strategy=tf.distribute.get_strategy())
    with pytest.raises(Exception):
        compat.build_from_input(model, epoch_iterator)
    layer = keras.layers.Dense(1, name="after")
    layer.build((None, 3))
    assert layer.kernel.path == "after/kernel", (
        "a failed Trainer._symbolic_build left Keras' name scope of the "
        "model pushed (global 'name_scope_stack'): every later layer's "
        f"variables are prefixed: {layer.kernel.path}")


def test_global_generators_are_keras_and_tf_global_rngs():
    keras.random.normal((1,))  # creates Keras' global SeedGenerator
    tf.random.get_global_generator()
    names = dict(compat.global_generators())
    assert set(names) == {"keras_global_seed_generator",
                          "tf_global_generator"}, (
        f"Keras' global_seed_generator or TF's global_generator moved: {names}")
    before = names["keras_global_seed_generator"].numpy().copy()
    keras.random.normal((1,))
    assert not np.array_equal(
        before, names["keras_global_seed_generator"].numpy())


# ---------------------------------------------------------------------------
# tf.distribute and the coordination service; TF's checkpoint format.
# ---------------------------------------------------------------------------


def test_coordination_service_key_value_store():
    code = textwrap.dedent("""
        import json, os, socket
        s = socket.socket(); s.bind(("localhost", 0))
        port = s.getsockname()[1]; s.close()
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"localhost:{port}"]},
            "task": {"type": "worker", "index": 0}})
        import tensorflow as tf
        from keras_ckpt import _keras_compat as compat
        print("before", compat.coordination_service_enabled())
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        print("after", compat.coordination_service_enabled(),
              compat.in_multi_worker_mode(strategy),
              callable(strategy.extended._in_multi_worker_mode))
        print("set", compat.coordination_set("k/a", "1"),
              compat.coordination_set("k/a", "2"))
        print("get", compat.coordination_get("k/a", 1000),
              compat.coordination_get("k/missing", 1))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=180)
    lines = [line for line in result.stdout.splitlines()
             if line.split(" ")[0] in ("before", "after", "set", "get")]
    assert lines == ["before False", "after True False True",
                     "set True False", "get 1 None"], (
        "TF's coordination service key-value store (context.context()."
        "set_config_key_value/get_config_key_value) changed:\n"
        + result.stdout[-1000:] + result.stderr[-2000:])


def test_local_value_of_a_plain_variable_is_itself():
    variable = tf.Variable(1.0)
    assert compat.local_value(variable) is variable
    assert not compat.in_multi_worker_mode(tf.distribute.get_strategy())


def test_tensor_list_is_written_by_tf_train_checkpoint(tmp_path):
    tensors = [tf.constant([1.0, 2.0]), tf.constant(3, tf.int64)]
    prefix = tf.train.Checkpoint(group=compat.tensor_list(tensors)).write(
        str(tmp_path / "ckpt"))
    reader = tf.train.load_checkpoint(prefix)
    keys = {k for k in reader.get_variable_to_shape_map()
            if k.startswith("group/")}
    # manager.tensor_key("group", i), which restores read.
    assert keys == {"group/.ATTRIBUTES/00000", "group/.ATTRIBUTES/00001"}, (
        "tf.__internal__.tracking.Trackable._serialize_to_tensors no longer "
        f"names the saved tensors as keras_ckpt reads them: {keys}")
    np.testing.assert_array_equal(
        reader.get_tensor("group/.ATTRIBUTES/00000"), [1.0, 2.0])


def test_print_msg_and_safe_mode_scope(capsys):
    compat.print_msg("hello from keras_ckpt")
    assert "hello from keras_ckpt" in capsys.readouterr().out
    from keras.src.saving import serialization_lib

    with compat.safe_mode_scope():
        assert serialization_lib.in_safe_mode(), (
            "keras.src.saving.serialization_lib.SafeModeScope no longer "
            "turns safe mode on")


# ---------------------------------------------------------------------------
# Every internal stays in _keras_compat.py.
# ---------------------------------------------------------------------------

_PRIVATE_KERAS_ATTRIBUTES = {
    "_initial_epoch", "_training_state", "_symbolic_build",
    "_flatten_layers", "_compile_metrics", "_global_train_batch", "_writers",
    "_enumerate_iterator", "_get_iterator", "_current_iterator",
    "_learning_rate", "_built", "_in_multi_worker_mode", "_dataset",
    "_serialize_to_tensors", "_as_serialized_graph", "_save", "_restore",
}


def _internal_touches(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "__internal__":
                yield node.lineno, "tf.__internal__"
            elif node.attr in _PRIVATE_KERAS_ATTRIBUTES and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"
            ):
                yield node.lineno, f"._{node.attr.lstrip('_')}"
            elif node.attr == "context" and isinstance(
                    node.value, ast.Name) and node.value.id == "context":
                yield node.lineno, "context.context()"
        elif isinstance(node, ast.Call) and isinstance(
                node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in _PRIVATE_KERAS_ATTRIBUTES:
                yield node.lineno, f"getattr(..., {node.args[1].value!r})"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            names = [module] + [a.name for a in node.names]
            if any(n.startswith(("keras.src", "tensorflow.python",
                                 "tensorflow.core", "tf_keras"))
                   for n in names):
                yield node.lineno, f"import of {names}"


def test_internals_stay_here():
    planted = ast.parse(textwrap.dedent("""
        model._initial_epoch = 3
        getattr(optimizer, "_built", False)
        from tensorflow.python.eager import context
        context.context().get_config_key_value("k", 1)
        tf.__internal__.tracking.Trackable
        self._save()
        from tensorflow.core.protobuf import saved_model_pb2
    """))
    assert sorted(line for line, _ in _internal_touches(planted)) == [
        2, 3, 4, 5, 6, 8]  # not self._save(): keras_ckpt's own attribute
    root = os.path.join(os.path.dirname(compat.__file__))
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == compat.__file__:
                continue
            with open(path) as f:
                tree = ast.parse(f.read())
            found += [f"{os.path.relpath(path, root)}:{line}: {what}"
                      for line, what in _internal_touches(tree)]
    assert not found, (
        "Keras/TF internals touched outside keras_ckpt/_keras_compat.py; move "
        "each behind a function there, with a test here:\n" + "\n".join(found))


def test_saved_model_signatures(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.export(str(tmp_path / "m"), format="tf_saved_model", verbose=False)
    names = compat.saved_model_signatures(str(tmp_path / "m" /
                                              "saved_model.pb"))
    assert {"serve", "serving_default"} <= set(names)
