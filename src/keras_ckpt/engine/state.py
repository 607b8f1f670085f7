"""What a checkpoint holds.

`TrainingState` gathers every value that decides the next training step:

- `model`: `model.variables` — trainable and non-trainable weights *and* the
  states of the model's `SeedGenerator`s (dropout RNG), which
  `tf.train.Checkpoint(model=model)` silently omits in Keras 3;
- `optimizer`: `optimizer.variables` (hence `iterations` and the learning-rate
  schedule position, and a float learning rate changed by a callback);
- `metrics`: `model.metrics_variables`, so a mid-epoch resume logs the same
  epoch metrics as an uninterrupted run;
- `rng`: Keras' global `SeedGenerator` and TF's global `tf.random.Generator`,
  when the program created them;
- `state/<name>`: every object passed in `Checkpoint(state=...)` — Keras
  callbacks through built-in adapters, objects with `get_state()`/
  `set_state()`, and TensorFlow/Keras variables, generators and modules.

A snapshot is a set of tensors (written by `manager.py`) plus JSON-able values
(written to the manifest). Snapshot tensors are the variables' current
buffers: TensorFlow copies a variable's buffer before updating it in place
while a reader still holds it, so a snapshot stays consistent while training
continues, at the cost of one copy of the variables that the next step
updates.
"""

import dataclasses
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_ckpt import _keras_compat as compat
from keras_ckpt.errors import IncompatibleCheckpointError

# ---------------------------------------------------------------------------
# Adapters for objects passed in `state=`.
# ---------------------------------------------------------------------------

_MONITOR_FIELDS = compat.callback_state_fields()
# Callbacks whose behaviour depends only on the epoch and the optimizer state,
# both of which are restored: accepted in `state=` with nothing to save.
_STATELESS = compat.stateless_callbacks()


class _AttributeAdapter:
    """get_state/set_state over a fixed list of attributes of a callback."""

    def __init__(self, obj, fields):
        self.obj = obj
        self.fields = fields

    def get_state(self):
        state = {}
        for field in self.fields:
            value = getattr(self.obj, field, None)
            if isinstance(value, list) and value and all(
                isinstance(v, np.ndarray) for v in value
            ):
                value = [np.array(v, copy=True) for v in value]
            state[field] = value
        return state

    def set_state(self, state):
        for field in self.fields:
            if field in state:
                setattr(self.obj, field, state[field])


class _ObjectAdapter:
    """An object with its own `get_state()` / `set_state(dict)`."""

    def __init__(self, obj):
        self.obj = obj

    def get_state(self):
        state = self.obj.get_state()
        if not isinstance(state, dict):
            raise TypeError(
                f"{type(self.obj).__name__}.get_state() must return a dict. "
                f"Received: {type(state).__name__}"
            )
        return state

    def set_state(self, state):
        self.obj.set_state(state)


class _IteratorAdapter:
    """A `tf.data` iterator of a custom loop: its position, saved by tf.data
    itself (O(1), no batch is read again on resume)."""

    def __init__(self, iterator):
        self.obj = iterator

    def get_state(self):
        saved = compat.save_iterator(self.obj)
        if saved is None:
            raise TypeError(
                "a tf.data iterator in `state=` whose position tf.data "
                "cannot save (a distributed iterator, `from_generator`, a "
                "`py_function`, ...); save its position as a number in an "
                "object with get_state()/set_state() instead.")
        return {"iterator": np.frombuffer(saved, dtype=np.uint8)}

    def set_state(self, state):
        compat.restore_iterator(
            self.obj, np.asarray(state["iterator"]).tobytes())


def _trackable_variables(obj):
    """Variables of a TF/Keras stateful object, or None if it is not one."""
    if isinstance(obj, (tf.Variable, keras.Variable)):
        return [obj]
    if isinstance(obj, tf.random.Generator):
        return [obj.state]
    if isinstance(obj, keras.random.SeedGenerator):
        return [obj.state]
    if isinstance(obj, (keras.layers.Layer, keras.metrics.Metric)):
        return list(obj.variables)
    if isinstance(obj, keras.optimizers.Optimizer):
        return list(obj.variables)
    if isinstance(obj, tf.Module):
        return list(obj.variables)
    return None


def _callback_adapter(obj):
    if isinstance(obj, tf.data.Iterator):
        return _IteratorAdapter(obj)
    for cls, fields in _MONITOR_FIELDS.items():
        if isinstance(obj, cls) and not _has_own_state_methods(obj):
            return _AttributeAdapter(obj, fields)
    if _has_own_state_methods(obj):
        return _ObjectAdapter(obj)
    if isinstance(obj, _STATELESS):
        return _AttributeAdapter(obj, ())
    return None


def _has_own_state_methods(obj):
    return callable(getattr(obj, "get_state", None)) and callable(
        getattr(obj, "set_state", None)
    )


@dataclasses.dataclass
class StateEntry:
    """One object passed in `state=`: either variables or an adapter."""

    name: str
    obj: object
    variables: list = None
    adapter: object = None

    @property
    def is_callback(self):
        return isinstance(self.obj, compat.CALLBACK_TYPES)


def parse_state_argument(state):
    """Validates `Checkpoint(state=...)`; returns a list of `StateEntry`."""
    if state is None:
        return []
    if not isinstance(state, dict):
        raise ValueError(
            "Invalid value for argument `state`. Expected a dict mapping "
            "names to callbacks, TF/Keras variables or objects with "
            f"get_state()/set_state(). Received: state={state!r}"
        )
    entries = []
    for name, obj in state.items():
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(
                "Invalid value for argument `state`: keys must be names made "
                f"of letters, digits and underscores. Received: {name!r}"
            )
        variables = _trackable_variables(obj)
        adapter = None if variables is not None else _callback_adapter(obj)
        if variables is None and adapter is None:
            raise ValueError(
                f"Invalid value for argument `state`: state[{name!r}] is a "
                f"{type(obj).__name__}, which keras_ckpt cannot save. Pass a "
                "Keras callback with a built-in adapter (EarlyStopping, "
                "ReduceLROnPlateau, ModelCheckpoint, LearningRateScheduler), "
                "an object with get_state() -> dict and set_state(dict), or a "
                "tf.Variable / keras.Variable / tf.random.Generator / tf.Module."
            )
        entries.append(StateEntry(name, obj, variables, adapter))
    return entries


# ---------------------------------------------------------------------------
# Snapshots.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """A consistent copy of everything a checkpoint holds, at one step.

    Attributes:
        tensors: {group: [tensor, ...]} in the order of `specs`.
        specs: {group: [[path, shape, dtype], ...]}, stored in the manifest.
        values: {name: JSON-able dict} of the `state=` adapters.
    """

    tensors: dict
    specs: dict
    values: dict

    @property
    def nbytes(self):
        return sum(
            int(np.prod(t.shape)) * t.dtype.size
            for group in self.tensors.values()
            for t in group
        )


def _spec(path, variable):
    return [path, [int(d) for d in variable.shape], _dtype_name(variable)]


def _dtype_name(variable):
    dtype = variable.dtype
    return dtype if isinstance(dtype, str) else tf.as_dtype(dtype).name


def _read(variable):
    # The variable's current buffer; see the module docstring for why holding
    # it is a consistent snapshot.
    return tf.convert_to_tensor(compat.local_value(variable))


def _encode_value(name, key, value, arrays):
    """JSON-able form of an adapter value; arrays go to `arrays`."""
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, np.ndarray) for v in value
    ):
        start = len(arrays)
        arrays.extend(value)
        return {"__arrays__": [start, len(arrays)]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, str, numbers.Number)):
        return float(value) if isinstance(value, float) else value
    if isinstance(value, (list, tuple)):
        return [_encode_value(name, key, v, arrays) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode_value(name, k, v, arrays) for k, v in value.items()}
    if hasattr(value, "numpy"):
        return _encode_value(name, key, np.asarray(value), arrays)
    raise TypeError(
        f"state[{name!r}] returned {key}={value!r} of type "
        f"{type(value).__name__}; get_state() may return numbers, strings, "
        "None, numpy arrays, and lists/dicts of those."
    )


def _decode_value(value, arrays):
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        if set(value) == {"__arrays__"}:
            start, stop = value["__arrays__"]
            return list(arrays[start:stop])
        return {k: _decode_value(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_value(v, arrays) for v in value]
    return value


class TrainingState:
    """Everything a checkpoint holds for one model and its `state=` objects."""

    def __init__(self, model, entries=()):
        self.model = model
        self.entries = list(entries)

    # -- grouping -------------------------------------------------------
    def variable_groups(self, include_optimizer=True, include_metrics=True):
        """{group: [(path, variable)]} with every variable exactly once."""
        seen = set()
        groups = {}

        def add(group, variables):
            items = []
            for i, v in enumerate(variables):
                path, v = v if isinstance(v, tuple) else (None, v)
                if id(v) in seen:
                    continue
                seen.add(id(v))
                items.append((path or getattr(v, "path", None) or f"{group}/{i}", v))
            groups[group] = items

        add("model", self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if include_optimizer and optimizer is not None and (
            compat.optimizer_built(optimizer)
        ):
            add("optimizer", _optimizer_variables(optimizer))
        if include_optimizer:
            for attr, other in attribute_optimizers(self.model):
                if compat.optimizer_built(other):
                    add(f"optimizer/{attr}", _optimizer_variables(other))
        if include_metrics:
            metrics = getattr(self.model, "metrics_variables", [])
            add("metrics", metrics)
            replicas = _replica_copies(metrics)
            if replicas:
                groups["metrics/replicas"] = replicas
        add("rng", compat.global_generators())
        for entry in self.entries:
            if entry.variables is not None:
                add(f"state/{entry.name}", entry.variables)
        return {k: v for k, v in groups.items() if v}

    def specs(self, **kwargs):
        return {
            group: [_spec(path, v) for path, v in items]
            for group, items in self.variable_groups(**kwargs).items()
        }

    # -- saving ---------------------------------------------------------
    def snapshot(self, extra=None):
        """Takes a consistent `Snapshot` of the current training state.

        Args:
            extra: dict or None, {name: state dict} saved like the state of
                an adapter (the data position, under `DATA_POSITION`).
        """
        groups = self.variable_groups()
        tensors = {g: [_read(v) for _, v in items] for g, items in groups.items()}
        specs = {
            g: [_spec(path, v) for path, v in items] for g, items in groups.items()
        }
        values = {}
        states = [(e.name, e.adapter.get_state()) for e in self.entries
                  if e.adapter is not None]
        states += list((extra or {}).items())
        for name, state in states:
            arrays = []
            encoded = {
                str(k): _encode_value(name, k, v, arrays)
                for k, v in state.items()
            }
            values[name] = encoded
            if arrays:
                group = f"adapter/{name}"
                tensors[group] = [tf.constant(a) for a in arrays]
                specs[group] = [
                    [f"{name}/{i}", list(a.shape), str(a.dtype)]
                    for i, a in enumerate(arrays)
                ]
        return Snapshot(tensors=tensors, specs=specs, values=values)

    # -- restoring ------------------------------------------------------
    def check_compatible(self, saved_specs, source, include_optimizer=True):
        """Raises `IncompatibleCheckpointError` unless shapes/dtypes match."""
        live = self.specs(include_optimizer=include_optimizer,
                          include_metrics=False)
        for group, live_specs in live.items():
            if group == "rng":
                continue
            saved = saved_specs.get(group)
            if saved is None:
                if group == "optimizer" and not saved_specs.get("optimizer"):
                    continue
                raise IncompatibleCheckpointError(
                    f"Checkpoint {source} holds no {group!r} variables, but the "
                    f"model has {len(live_specs)}. It was written by a "
                    "different model or optimizer."
                )
            problem = _first_mismatch(live_specs, saved)
            if problem:
                raise IncompatibleCheckpointError(
                    f"Checkpoint {source} does not match this model's "
                    f"{group} variables: {problem}. It was written by a "
                    "different model or optimizer: give this model its own "
                    "`directory`."
                )

    def assign(self, arrays, groups):
        """Assigns {group: [array]} to the live variables of `groups`."""
        live = self.variable_groups()
        for group in groups:
            if group not in arrays or group not in live:
                continue
            if group == "rng":
                # Global generators exist only once the program used them, so
                # match them by name rather than by position.
                saved = dict(zip(arrays["rng_paths"], arrays["rng"]))
                for path, variable in live["rng"]:
                    if path in saved:
                        variable.assign(saved[path])
                continue
            for (_, variable), value in zip(live[group], arrays[group]):
                variable.assign(value)

    def assign_metrics(self, specs, arrays):
        """Restores the running metrics; False if the compiled metrics differ.

        Under a strategy with several local replicas each replica's copy of an
        accumulator is restored as saved (bit for bit) when the checkpoint has
        the same number of replicas; otherwise the saved sum is assigned,
        which the strategy splits evenly between the copies.
        """
        live = self.variable_groups()
        live_specs = [_spec(p, v) for p, v in live.get("metrics", [])]
        if [s[1:] for s in live_specs] != [s[1:] for s in specs.get("metrics", [])]:
            return False
        self.assign(arrays, ["metrics"])
        copies = live.get("metrics/replicas", [])
        saved = arrays.get("metrics/replicas", [])
        saved_specs = specs.get("metrics/replicas", [])
        if copies and [_spec(p, v)[1:] for p, v in copies] == [
            s[1:] for s in saved_specs
        ] and len(saved) == len(copies):
            for (_, copy), value in zip(copies, saved):
                copy.assign(value)
        return True

    def apply_values(self, values, arrays, names=None):
        """Calls `set_state` of the adapters (all, or those in `names`)."""
        for entry in self.entries:
            if entry.adapter is None or entry.name not in values:
                continue
            if names is not None and entry.name not in names:
                continue
            own_arrays = arrays.get(f"adapter/{entry.name}", [])
            entry.adapter.set_state(
                _decode_value(values[entry.name], own_arrays)
            )


def attribute_optimizers(model):
    """[(attribute, optimizer)] the model holds besides `model.optimizer`.

    A subclassed model that overrides `train_step` with several optimizers
    (Keras' DCGAN example: `d_optimizer`, `g_optimizer`) keeps them as
    attributes; their slots and `iterations` are training state too.
    """
    main = getattr(model, "optimizer", None)
    found = []
    for attr, value in sorted(vars(model).items()):
        if attr.startswith("_") or value is main:
            continue
        if isinstance(value, keras.optimizers.Optimizer) and all(
            value is not other for _, other in found
        ):
            found.append((attr, value))
    return found


def _replica_copies(variables):
    """[(path, copy)] of every replica's copy of sync-on-read variables."""
    from keras_ckpt import _keras_compat as compat

    copies = []
    for variable in variables:
        components = compat.replica_components(variable)
        if components is None:
            continue
        path = getattr(variable, "path", None) or variable.name
        copies.extend((f"{path}/replica_{i}", c)
                      for i, c in enumerate(components))
    return copies


def _optimizer_variables(optimizer):
    """`optimizer.variables`, plus a learning-rate variable kept outside it.

    Keras 3 lists its learning-rate variable; tf_keras' optimizers do not,
    so a LR changed by ReduceLROnPlateau would not be saved.
    """
    variables = list(optimizer.variables)
    learning_rate = compat.optimizer_learning_rate(optimizer)
    if isinstance(learning_rate, (tf.Variable, keras.Variable)) and all(
        learning_rate is not v for v in variables
    ):
        variables.append(learning_rate)
    return variables


def _first_mismatch(live, saved):
    if len(live) != len(saved):
        return f"{len(saved)} saved vs {len(live)} in the model"
    for (path, shape, dtype), (spath, sshape, sdtype) in zip(live, saved):
        if list(shape) != list(sshape) or dtype != sdtype:
            return (
                f"{path} is {tuple(shape)} {dtype} in the model but "
                f"{spath} is {tuple(sshape)} {sdtype} in the checkpoint"
            )
    return None


# ---------------------------------------------------------------------------
# The data position.
# ---------------------------------------------------------------------------

DATA_POSITION = "data-position"  # not a valid `state=` name: no clash


class DataPosition:
    """Where the input pipeline is, so that a resume trains on the same data.

    Keras' `fit` draws each epoch's batches from an iterator: a new one every
    epoch, or one kept across epochs when `steps_per_epoch` is given (e.g.
    `ds.repeat()`). What decides the next batch is therefore:

    - how many iterators of the dataset `fit` created before the one the
      next batch comes from (one per epoch, plus one at the end of an epoch
      that used up a finite input): a tf.data `shuffle(..., seed=s)`
      reshuffles with every new iterator (`reshuffle_each_iteration=True`,
      the default), so the resumed run creates (and drops) as many first;
    - how far that iterator is: restored from its saved state when tf.data
      can serialize it (O(1): no batch is read again), else replayed by
      pulling the batches again (exact when the input is deterministic);
    - Python's and NumPy's global RNG states at the start of the epoch:
      Keras shuffles a `PyDataset`'s batch order with `random`, and
      generators often draw from `np.random`.

    A Python generator is one stream for the whole fit: every batch drawn
    from it (`total`) is replayed.
    """

    def __init__(self):
        self.epoch_iterator = None
        self.kind = None
        self.reshuffles = False
        self.created = 0  # data iterators fit created (see `attach`)
        self.last_created = None  # (iterator, its number among `created`)
        self.iterator = None  # the one the last trained batch came from
        self.iterator_number = 0
        self.offset = 0  # batches trained from `self.iterator`
        self.total = 0  # batches trained in all (a generator's position)
        self.epoch_rng = None
        self.resume = None  # decoded state to seek to, once

    def attach(self, epoch_iterator):
        """Follows `fit`'s `EpochIterator`; returns its tf.data shuffles."""
        from keras_ckpt import _keras_compat as compat

        self.epoch_iterator = epoch_iterator
        self.kind = compat.input_kind(epoch_iterator)
        compat.watch_iterator_creation(epoch_iterator, self._created)
        dataset = compat.user_dataset(epoch_iterator)
        shuffles = compat.dataset_shuffles(dataset) if dataset is not None else []
        self.reshuffles = any(reshuffles for _, reshuffles in shuffles)
        return shuffles

    def _created(self, iterator):
        self.created += 1
        self.last_created = (iterator, self.created)

    def on_epoch_begin(self):
        from keras_ckpt import _keras_compat as compat

        rng = self.resume.pop("rng", None) if self.resume else None
        if rng is not None:
            compat.set_global_rng_states(rng)
        self.epoch_rng = compat.global_rng_states()

    def get_state(self, batch_in_epoch):
        """The position of the next batch to train (JSON values + arrays)."""
        from keras_ckpt import _keras_compat as compat

        if self.epoch_iterator is None:
            return None
        if self.epoch_iterator.steps_per_epoch is not None:
            upcoming = compat.current_data_iterator(self.epoch_iterator)
        else:  # a new iterator every epoch
            upcoming = self.iterator if batch_in_epoch > 0 else None
        before, offset = self.created, 0  # a new one will be created
        if upcoming is not None and upcoming is self.iterator:
            before, offset = self.iterator_number - 1, self.offset
        elif upcoming is not None and self.last_created is not None and (
            upcoming is self.last_created[0]
        ):
            before = self.last_created[1] - 1
        state = {
            "kind": self.kind,
            "before": before,
            "offset": offset,
            "total": self.total,
            "rng": self.epoch_rng if batch_in_epoch > 0 and self.epoch_rng
            else compat.global_rng_states(),
        }
        if offset and self.kind == "tf.data":
            saved = compat.save_iterator(self.iterator)
            if saved is not None:
                state["iterator"] = np.frombuffer(saved, dtype=np.uint8)
        return state

    def set_resume(self, values, arrays):
        self.resume = _decode_value(values, arrays) if values else None

    def batches(self, enumerate_epoch, skip_batches, on_seek):
        """The epoch's `(begin, end, iterator)` steps that `fit` trains.

        On the resumed epoch, seeks the input to the saved position and hides
        the steps trained before the restart: neither `fit`, its progress bar
        nor any callback sees them. `on_seek(last_batch)` runs right after the
        seek (the last batch read, or None), before the first trained step.
        """
        from keras_ckpt import _keras_compat as compat

        resume, self.resume = self.resume, None
        if resume is not None and resume.get("kind") != self.kind:
            resume = None  # another input form than the saved run's
        if resume is None and skip_batches:
            # No data position (a checkpoint of an older keras_ckpt, or of
            # another input form): draw the epoch's trained batches again.
            resume = {"before": self.created, "offset": skip_batches,
                      "total": skip_batches}
        if resume is not None:
            before = int(resume["before"])
            if self.kind == "tf.data" and self.reshuffles:
                while self.created < before:
                    # Advances the shuffle's seed as the interrupted run did.
                    compat.create_data_iterator(self.epoch_iterator)
            self.created = max(self.created, before)
        sought = resume is None
        for begin, end, iterator in enumerate_epoch:
            if iterator is not self.iterator:
                self.iterator, self.offset = iterator, 0
                known = self.last_created is not None and (
                    self.last_created[0] is iterator)
                self.iterator_number = (
                    self.last_created[1] if known else self.created)
            if not sought:
                sought = True
                on_seek(self._seek(iterator, resume))
            if begin < skip_batches:
                continue
            yield begin, end, iterator
            self.offset += end - begin + 1
            self.total += end - begin + 1

    def _seek(self, iterator, resume):
        from keras_ckpt import _keras_compat as compat

        self.total = int(resume["total"])
        self.offset = int(resume["offset"])
        # A generator is one stream for the whole fit.
        count = self.total if self.kind == "generator" else self.offset
        state = resume.get("iterator")
        if state is not None and self.kind == "tf.data":
            compat.restore_iterator(iterator, np.asarray(state).tobytes())
            return None
        last = None
        for _ in range(count):
            last = next(iterator)
        return last
