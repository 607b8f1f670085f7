"""Every touch of a Keras or TensorFlow internal that exact resume needs.

Keras' `fit` has no public "start at batch N" and no public handle on the
data iterator it trains from, so a few private names are unavoidable. They
live here, each behind a small function, and `tests/test_keras_compat.py`
checks every one of them against the installed Keras/TensorFlow, so that an
upgrade that renames one fails loudly in the test suite instead of silently
breaking a resume.

Verified on Keras 3.15 / TensorFlow 2.21 (TensorFlow backend), and on
tf_keras 2.21 under `TF_USE_LEGACY_KERAS=1`.

Sections: which Keras (tf_keras shims); where `fit` starts; the running fit;
the input; model, metrics and variables; global RNGs; built-in callbacks;
`tf.distribute` and the coordination service; TensorFlow's checkpoint format;
Keras utilities. `tests/test_keras_compat.py::test_internals_stay_here`
keeps them here.
"""

import contextlib
import functools
import os
import sys

import keras
import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------
# Which Keras: Keras 3, or tf_keras (Keras 2) under TF_USE_LEGACY_KERAS=1.
# ---------------------------------------------------------------------------

LEGACY_KERAS_VALUES = ("true", "True", "1")  # as TensorFlow reads the switch


def uses_legacy_keras(environ=None):
    """Whether `tf.keras` is `tf_keras` (`TF_USE_LEGACY_KERAS=1`, read by
    TensorFlow 2.16+ when `tf.keras` is first used)."""
    env = os.environ if environ is None else environ
    return env.get("TF_USE_LEGACY_KERAS") in LEGACY_KERAS_VALUES


def _import_tf_keras():
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras


tf_keras = _import_tf_keras() if uses_legacy_keras() else None

# The base class of keras_ckpt's callbacks: tf_keras' CallbackList calls
# tf_keras-only methods (`_implements_train_batch_hooks`, ...) on every
# callback it is given, and Keras 3's calls Keras 3-only ones.
Callback = tf_keras.callbacks.Callback if tf_keras else keras.callbacks.Callback

# Everything `isinstance` should accept as a Keras callback in `state=`.
CALLBACK_TYPES = (keras.callbacks.Callback,) + (
    (tf_keras.callbacks.Callback,) if tf_keras else ()
)


def callback_state_fields():
    """{callback class: attributes that hold its state}, Keras 3 and tf_keras.

    Keras 3.15's `EarlyStopping`, `ReduceLROnPlateau` and `ModelCheckpoint`
    have no `get_state()`; their progress lives in these attributes (two of
    `ModelCheckpoint`'s are private). tf_keras' twins use the same names.
    """
    fields = {}
    for module in (keras, tf_keras):
        if module is None:
            continue
        callbacks = module.callbacks
        fields.update({
            callbacks.EarlyStopping: (
                "wait", "stopped_epoch", "best", "best_epoch", "best_weights",
            ),
            callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
            callbacks.ModelCheckpoint: (
                "best", "_batches_seen_since_last_saving", "_last_batch_seen",
            ),
        })
    return fields


def stateless_callbacks():
    """Callbacks whose behaviour depends only on the epoch and the optimizer
    state (both restored): accepted in `state=` with nothing to save."""
    return tuple(
        cls for module in (keras, tf_keras) if module is not None
        for cls in (module.callbacks.LearningRateScheduler,
                    module.callbacks.TerminateOnNaN))


def is_legacy_model(model):
    """Whether `model` is a tf_keras (Keras 2) model."""
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(model, module.Model)


def optimizer_built(optimizer):
    """Keras 3 optimizers say `built`; tf_keras' new ones keep `_built`."""
    built = getattr(optimizer, "built", None)
    if built is None:
        built = getattr(optimizer, "_built", False)
    return bool(built)


def optimizer_learning_rate(optimizer):
    """The optimizer's learning-rate variable (or schedule, or None).

    Keras 3 lists the variable in `optimizer.variables`; tf_keras' optimizers
    keep it in `_learning_rate` and do not list it.
    """
    return getattr(optimizer, "_learning_rate", None)


def steps_per_execution(model):
    """Batches per call of `train_function` (a variable in tf_keras)."""
    value = getattr(model, "steps_per_execution", None)
    if isinstance(value, (tf.Variable, tf.distribute.DistributedValues)):
        value = local_value(value).numpy()
    return max(1, int(value or 1))


# ---------------------------------------------------------------------------
# Where fit starts: the epoch of the checkpoint resumed from.
# ---------------------------------------------------------------------------


class _ResumePosition:
    """tf_keras' hook for the epoch `fit` starts at.

    tf_keras' `fit` asks `model._training_state` (the slot its own
    `BackupAndRestore` fills) for the initial epoch and step right after the
    callbacks' `on_train_begin`; Keras 3's `fit` reads `model._initial_epoch`
    at the same moment. The step stays 0: the already-trained batches of the
    interrupted epoch are pulled from the iterator by `Checkpoint`, as under
    Keras 3, so that the data the next batch trains on is the right one.
    """

    def __init__(self, epoch):
        self.epoch = epoch

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch,
                                              initial_epoch, mode=None):
        del steps_per_epoch, initial_epoch, mode
        return self.epoch, 0


def set_initial_epoch(model, epoch):
    """Makes the running `fit` start at `epoch` (Keras 3 and tf_keras).

    Keras 3.15's `fit` reads `model._initial_epoch` right after
    `on_train_begin` (what `BackupAndRestore` sets).
    """
    model._initial_epoch = epoch
    if is_legacy_model(model):
        model._training_state = _ResumePosition(epoch)


def clear_initial_epoch(model):
    model._initial_epoch = None
    if isinstance(getattr(model, "_training_state", None), _ResumePosition):
        model._training_state = None

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


def saved_model_signatures(path):
    """The signature names of the first meta graph of `saved_model.pb` at
    `path` (TensorFlow's SavedModel proto)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        saved_model.ParseFromString(f.read())
    return list(saved_model.meta_graphs[0].signature_def)


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
    with _name_scopes_kept():
        model._symbolic_build(
            data_batch=zeros_like_spec(_input_spec(epoch_iterator)))


def trace_train_step(model, epoch_iterator):
    """Traces `model.train_step` once on the input's spec, without running
    it: what `fit`'s first trace creates lazily (layers built in `call`,
    optimizer slots created by the first `apply_gradients`) then exists,
    and nothing was updated.

    Keras 3 creates variables met while tracing in an `init_scope`, so they
    outlive this throwaway trace; `fit` traces its own function afterwards
    and finds them built.
    """
    with _name_scopes_kept(), model.distribute_strategy.scope():
        tf.function(model.train_step).get_concrete_function(
            _input_spec(epoch_iterator))


@contextlib.contextmanager
def _name_scopes_kept():
    """Puts Keras' name-scope stack back if what runs inside fails.

    Keras 3.15 pushes a model's name scope (global attribute
    `"name_scope_stack"`) before checking the name: a model whose class
    name starts with "_" fails with its scope left pushed, and every layer
    created afterwards in the process would get that prefix.
    """
    from keras.src.backend.common import global_state

    stack = global_state.get_global_attribute("name_scope_stack")
    kept = list(stack) if stack is not None else None
    try:
        yield
    except Exception:
        global_state.set_global_attribute("name_scope_stack", kept)
        raise


def _input_spec(epoch_iterator):
    """The `element_spec` of the input `fit` trains on (Keras 3's
    `TFEpochIterator` keeps the dataset it iterates in `_get_iterator()`;
    the class's method, not a wrapper installed on the instance)."""
    return type(epoch_iterator)._get_iterator(epoch_iterator).element_spec


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


def global_generators():
    """[(name, state variable)] of the RNGs created outside the model.

    Keras 3.15 keeps its global `SeedGenerator` (drawn from by unseeded
    initializers and random ops) under the global attribute
    `"global_seed_generator"`; TensorFlow 2.21 keeps `tf.random`'s global
    `Generator` in `stateful_random_ops.global_generator`. Each is created
    on first use.
    """
    from keras.src.backend.common import global_state
    from tensorflow.python.ops import stateful_random_ops

    variables = []
    keras_gen = global_state.get_global_attribute("global_seed_generator")
    if keras_gen is not None:
        variables.append(("keras_global_seed_generator", keras_gen.state))
    tf_gen = getattr(stateful_random_ops, "global_generator", None)
    if tf_gen is not None:
        variables.append(("tf_global_generator", tf_gen.state))
    return variables


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


# ---------------------------------------------------------------------------
# tf.distribute, and the key-value store of TF's coordination service.
# ---------------------------------------------------------------------------


def in_multi_worker_mode(strategy):
    """Whether `strategy` trains across workers (TF 2.21's
    `strategy.extended._in_multi_worker_mode()`)."""
    extended = getattr(strategy, "extended", None)
    in_mode = getattr(extended, "_in_multi_worker_mode", None)
    return bool(in_mode and in_mode())


def local_value(variable):
    """The copy of `variable` this process holds, read without collectives.

    Reading a distributed variable in cross-replica context can aggregate it
    across replicas: for an `ON_READ` variable under
    `MultiWorkerMirroredStrategy` (batch-norm moving statistics in tf_keras)
    that is an all-reduce every worker must join, so a chief-only save would
    hang. In a multi-worker job the first local replica's copy is saved
    instead (a mirrored variable's copies are all equal anyway); on one host
    the variable is read as before.
    """
    if isinstance(variable, tf.distribute.DistributedValues) and (
        in_multi_worker_mode(getattr(variable, "distribute_strategy", None))
    ):
        return variable.values[0]
    return variable


def coordination_service_enabled():
    """Whether TF's coordination service runs (MultiWorkerMirroredStrategy
    starts it on the chief): TF 2.21's eager `context.coordination_service`."""
    from tensorflow.python.eager import context

    return context.context().coordination_service is not None


def coordination_set(key, value):
    """Sets `key` once in the coordination service's key-value store; False
    if it is already set (TF raises `AlreadyExistsError`)."""
    from tensorflow.python.eager import context

    try:
        context.context().set_config_key_value(key, value)
    except tf.errors.AlreadyExistsError:
        return False
    return True


def coordination_get(key, timeout_ms):
    """The value of `key`, waiting up to `timeout_ms` (0: no limit); None on
    timeout. Other `tf.errors.OpError`s (the cluster going down) propagate."""
    from tensorflow.python.eager import context

    try:
        return context.context().get_config_key_value(key, timeout_ms)
    except tf.errors.DeadlineExceededError:
        return None


# ---------------------------------------------------------------------------
# TensorFlow's checkpoint format.
# ---------------------------------------------------------------------------


def tensor_list(tensors):
    """A trackable that `tf.train.Checkpoint` saves as a list of tensors
    under keys `00000`, `00001`, ... (TF 2.21's
    `tf.__internal__.tracking.Trackable._serialize_to_tensors` protocol)."""
    return _tensor_list_class()(tensors)


@functools.cache
def _tensor_list_class():
    class _TensorList(tf.__internal__.tracking.Trackable):
        def __init__(self, tensors):
            self._tensors = tensors

        def _serialize_to_tensors(self):
            return {f"{i:05d}": t for i, t in enumerate(self._tensors)}

        def _restore_from_tensors(self, restored_tensors):
            raise NotImplementedError(
                "keras_ckpt reads checkpoints with a reader.")

    return _TensorList


# ---------------------------------------------------------------------------
# Keras utilities without a public name.
# ---------------------------------------------------------------------------


def print_msg(message, line_break=True):
    """Prints as Keras' progress bar does (`keras.src.utils.io_utils`:
    stdout, or absl logging when `keras.config.disable_interactive_logging`);
    `line_break=False` lets the next message rewrite the line."""
    from keras.src.utils import io_utils

    io_utils.print_msg(message, line_break=line_break)


def safe_mode_scope():
    """Keras' `SafeModeScope(True)`: unlike the `safe_mode=True` argument,
    not overridden by `keras.config.enable_unsafe_deserialization()`."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(True)
