"""Every touch of a Keras or TensorFlow internal that exact resume needs.

Keras' `fit` has no public "start at batch N" and no public handle on the
data iterator it trains from, so a few private names are unavoidable. They
live here, each behind a small function, and `tests/test_keras_compat.py`
checks every one of them against the installed Keras/TensorFlow, so that an
upgrade that renames one fails loudly in the test suite instead of silently
breaking a resume.

Verified on Keras 3.15 / TensorFlow 2.21 (TensorFlow backend).
"""

import sys

import keras
import numpy as np
import tensorflow as tf

# How far up the stack the running `fit` (or its `CallbackList`) may be from
# a callback hook: hook <- CallbackList method <- fit (+ tracebacks filter).
_MAX_FRAMES = 12


# ---------------------------------------------------------------------------
# The running fit: its CallbackList and its EpochIterator.
# ---------------------------------------------------------------------------


def calling_callback_list():
    """The Keras `CallbackList` whose method called the current hook.

    Keras 3's `CallbackList.__init__` calls `set_model` on every callback,
    and its `on_*` methods call the callbacks' hooks: the list is `self` in
    one of the caller frames. None when not called from a `CallbackList`.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList):
            return owner
        frame = frame.f_back
    return None


def sibling_callbacks(callback):
    """The callbacks of the `CallbackList` calling `callback`'s hook, or [].

    Keras gives a callback no reference to its list, yet `Checkpoint` needs
    its siblings (the `TensorBoard` to write save-cost scalars to, stateful
    callbacks left out of `state=`). Keras 3 and tf_keras both call each hook
    from a `CallbackList` method looping over `self.callbacks`, so the list
    is the caller's `self`: matched by that attribute, not by class, so that
    tf_keras' list is found too.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
        if isinstance(callbacks, list) and any(c is callback for c in callbacks):
            return list(callbacks)
        frame = frame.f_back
    return []


def running_epoch_iterator():
    """The `EpochIterator` of the `fit` that is calling the current hook.

    Keras 3's TensorFlow `fit` keeps it in its local `epoch_iterator` (it is
    not an attribute of the model). None when not called from Keras 3's fit.
    """
    from keras.src.trainers.epoch_iterator import EpochIterator

    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_name == "fit":
            candidate = frame.f_locals.get("epoch_iterator")
            if isinstance(candidate, EpochIterator):
                return candidate
        frame = frame.f_back
    return None


def wrap_epoch_batches(epoch_iterator, wrapper):
    """Routes every epoch's `(begin_step, end_step, iterator)` through
    `wrapper(original_generator)`, a generator that yields what `fit` sees.

    `EpochIterator.__iter__` builds one generator per epoch with
    `self._enumerate_iterator()`; an instance attribute of that name wins
    over the method. The wrapper sees the data iterator each step trains from
    and may consume batches before `fit` and the callbacks see a step.
    """
    original = type(epoch_iterator)._enumerate_iterator.__get__(epoch_iterator)
    epoch_iterator._enumerate_iterator = lambda: wrapper(original())


def unwrap_epoch_batches(epoch_iterator):
    for name in ("_enumerate_iterator", "_get_iterator"):
        epoch_iterator.__dict__.pop(name, None)


def watch_iterator_creation(epoch_iterator, on_iterator):
    """Calls `on_iterator(iterator)` for every data iterator `fit` creates.

    Keras creates them with `iter(self._get_iterator())`: one per epoch, and
    one more at the end of an epoch that used up a finite input (kept for
    the next epoch only with `steps_per_epoch`). Each one advances the seed
    of a reshuffling tf.data `shuffle`, so they are counted.
    """
    original = type(epoch_iterator)._get_iterator.__get__(epoch_iterator)

    class _Watched:
        def __init__(self, source):
            self.source = source

        def __iter__(self):
            iterator = iter(self.source)
            on_iterator(iterator)
            return iterator

    epoch_iterator._get_iterator = lambda: _Watched(original())


def create_data_iterator(epoch_iterator):
    """A new data iterator, created as `fit` creates one."""
    return iter(epoch_iterator._get_iterator())


def current_data_iterator(epoch_iterator):
    """The data iterator `epoch_iterator` will pull its next batch from, if it
    keeps one across epochs (`steps_per_epoch` given), else None."""
    if epoch_iterator.steps_per_epoch is None:
        return None
    return epoch_iterator._current_iterator


# ---------------------------------------------------------------------------
# The input: which kind, and what its position is.
# ---------------------------------------------------------------------------


def input_kind(epoch_iterator):
    """`"tf.data"`, `"py_dataset"`, `"generator"`, `"arrays"` or `"other"`."""
    from keras.src.trainers.data_adapters import array_data_adapter
    from keras.src.trainers.data_adapters import generator_data_adapter
    from keras.src.trainers.data_adapters import py_dataset_adapter
    from keras.src.trainers.data_adapters import tf_dataset_adapter

    adapter = epoch_iterator.data_adapter
    if isinstance(adapter, tf_dataset_adapter.TFDatasetAdapter):
        return "tf.data"
    if isinstance(adapter, py_dataset_adapter.PyDatasetAdapter):
        return "py_dataset"
    if isinstance(adapter, generator_data_adapter.GeneratorDataAdapter):
        return "generator"
    if isinstance(adapter, array_data_adapter.ArrayDataAdapter):
        return "arrays"
    return "other"


def user_dataset(epoch_iterator):
    """The user's `tf.data.Dataset` given to `fit`, or None."""
    if input_kind(epoch_iterator) != "tf.data":
        return None
    return epoch_iterator.data_adapter._dataset


_SHUFFLE_OPS = ("ShuffleDataset", "ShuffleDatasetV2", "ShuffleDatasetV3",
                "ShuffleAndRepeatDataset", "ShuffleAndRepeatDatasetV2")


def dataset_shuffles(dataset):
    """[(seeded, reshuffles)] for every shuffle in a tf.data pipeline.

    Read from the dataset's serialized graph: a shuffle whose `seed` and
    `seed2` inputs are both 0 got no seed (neither `seed=` nor
    `tf.random.set_seed`), so its order differs in every process.
    """
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    try:
        graph.ParseFromString(dataset._as_serialized_graph(
            external_state_policy=tf.data.experimental.ExternalStatePolicy.IGNORE
        ).numpy())
    except (tf.errors.OpError, TypeError, ValueError):
        return []
    consts = {node.name: node for node in graph.node if node.op == "Const"}

    def int_const(name):
        node = consts.get(name.split(":")[0].lstrip("^"))
        tensor = node.attr["value"].tensor if node is not None else None
        if tensor is None or tensor.dtype != tf.int64.as_datatype_enum:
            return None
        return int(tf.make_ndarray(tensor))

    found = []
    for node in graph.node:
        if node.op not in _SHUFFLE_OPS:
            continue
        seeds = [int_const(name) for name in node.input[2:4]]
        seeded = seeds != [0, 0]
        reshuffles = node.op in ("ShuffleAndRepeatDataset",
                                 "ShuffleAndRepeatDatasetV2") or bool(
            node.attr["reshuffle_each_iteration"].b
            if "reshuffle_each_iteration" in node.attr else False)
        found.append((seeded, reshuffles))
    return found


def save_iterator(iterator):
    """The serialized state of a tf.data iterator (bytes), or None when the
    iterator cannot be saved (a distributed iterator, `from_generator`, a
    `py_function`, ...)."""
    save = getattr(iterator, "_save", None)
    if save is None or not isinstance(iterator, tf.data.Iterator):
        return None
    try:
        state = save()
        return state.numpy() if hasattr(state, "numpy") else None
    except (tf.errors.OpError, ValueError, TypeError, NotImplementedError):
        return None


def restore_iterator(iterator, state):
    """Restores a state from `save_iterator` into a fresh iterator of the
    same pipeline."""
    iterator._restore(tf.constant(state))


# ---------------------------------------------------------------------------
# Model, metrics and variables.
# ---------------------------------------------------------------------------


def build_compiled_metrics(model, data_batch):
    """Creates the compiled metrics' variables without training a step.

    Without a distribution strategy Keras 3 builds them only when
    `train_function` is first traced; restoring the running metrics of the
    interrupted epoch needs them before that.
    """
    compile_metrics = getattr(model, "_compile_metrics", None)
    if compile_metrics is None or compile_metrics.built:
        return True
    model._symbolic_build(data_batch=data_batch)
    return compile_metrics.built


def model_unbuilt(model):
    """Whether some layer of `model` has not created its variables yet."""
    return not all(layer.built for layer in model._flatten_layers())


def build_from_input(model, epoch_iterator):
    """Builds an unbuilt model (and its optimizer, metrics and loss) from the
    shapes of the input `fit` trains on, as `fit`'s first trace would.

    Without a distribution strategy Keras 3 creates the variables of a model
    never called only when `train_function` is first traced, after
    `on_train_begin`; a restore needs them before. The batch is built from
    the dataset's `element_spec` (no batch is drawn from the input).
    """
    dataset = type(epoch_iterator)._get_iterator(epoch_iterator)
    model._symbolic_build(data_batch=zeros_like_spec(dataset.element_spec))


def zeros_like_spec(element_spec):
    """A batch of zeros matching a dataset's `element_spec` (for building)."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([d if d is not None else 1 for d in s.shape],
                           s.dtype), element_spec)


def replica_components(variable):
    """The per-replica copies of a sync-on-read variable (a metric's
    accumulator under `MirroredStrategy`), or None.

    Reading such a variable sums its copies, and assigning to it splits the
    value evenly between them: neither is bit-exact, so a checkpoint keeps
    each copy.
    """
    inner = getattr(variable, "value", variable)
    if not isinstance(inner, tf.distribute.DistributedValues):
        inner = getattr(variable, "_value", inner)
    if not isinstance(inner, tf.distribute.DistributedValues):
        return None
    if inner.synchronization != tf.VariableSynchronization.ON_READ:
        return None
    values = list(inner.values)
    return values if len(values) > 1 else None


def replace_train_function(model, function):
    """Swaps `model.train_function` (tf_keras' fit, which has no
    `EpochIterator`); returns the one it replaced."""
    original = model.train_function
    model.train_function = function
    return original


# ---------------------------------------------------------------------------
# Built-in callbacks whose records must continue across a resume.
# ---------------------------------------------------------------------------


def set_tensorboard_step(callback, step):
    """Makes a `TensorBoard` callback number the next batch `step + 1`, as
    the uninterrupted run does (its batch scalars use `_global_train_batch`,
    reset to 0 by its `on_train_begin`)."""
    callback._global_train_batch = int(step)
    if callback.update_freq != "epoch":
        # The default step of custom summaries, pushed by on_train_begin.
        callback._pop_writer()
        callback._push_writer(callback._train_writer, int(step))


def flush_tensorboard(callback):
    """Flushes a `TensorBoard` callback's event writers (if created)."""
    for writer in callback._writers.values():  # created on first use
        writer.flush()


def global_rng_states():
    """Python's and NumPy's global RNG states, as arrays.

    Keras' `PyDataset` adapter shuffles each epoch's batch order with
    Python's `random`, and user generators often draw from `np.random`.
    """
    version, internal, gauss = __import__("random").getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": np.asarray(internal, dtype=np.uint32),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy": np.asarray(keys, dtype=np.uint32),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached": float(cached),
        "numpy_name": str(name),
    }


def set_global_rng_states(states):
    import random

    random.setstate((
        int(states["python_version"]),
        tuple(int(v) for v in np.asarray(states["python"])),
        states["python_gauss"],
    ))
    np.random.set_state((
        states["numpy_name"], np.asarray(states["numpy"], dtype=np.uint32),
        int(states["numpy_pos"]), int(states["numpy_has_gauss"]),
        float(states["numpy_cached"]),
    ))
