"""One benchmark configuration, run in a fresh process (so peak RSS is its own).

Invoked by `benchmarks/run.py`; prints one JSON object on the last line of
stdout. Not meant to be run by hand, but it can be:

    .venv/bin/python benchmarks/worker.py --config kc_async --width 2048 \
        --layers 2 --batch 8 --save-freq 20 --saves 3 --repeats 1 \
        --tmp-root benchmarks/results/tmp

Configurations (same model, same data, same save points):
  none         fit without checkpointing (the baseline), then the floors:
               np.copy of every variable and raw write+fsync of that many bytes
  kc_async     keras_ckpt.Checkpoint(async_save=True)
  kc_sync      keras_ckpt.Checkpoint(async_save=False)
  tf_manager   tf.train.CheckpointManager(tf.train.Checkpoint(model, optimizer))
               saved every N batches from a minimal callback
  keras_backup keras.callbacks.BackupAndRestore(backup_dir, save_freq=N)
  keras_mc_weights  keras.callbacks.ModelCheckpoint(... .weights.h5,
               save_weights_only=True, save_freq=N)
  keras_mc_full     keras.callbacks.ModelCheckpoint(... .keras, save_freq=N)

Host modes (`--host`):
  cpu          TensorFlow's default thread pools: training uses every core,
               as CPU training does.
  accel        an accelerator-like host: TensorFlow's intra- and inter-op
               pools limited to 1 thread, set before TensorFlow runs an op, so
               training keeps one core busy and leaves the other free, as a
               host feeding a GPU/TPU does. `--device-ms` adds a fixed wait
               per step (time.sleep, no CPU, GIL released) for a device step.
"""

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time

CONFIGS = (
    "none", "kc_async", "kc_sync", "tf_manager", "keras_backup",
    "keras_mc_weights", "keras_mc_full",
)
_HOOKS = (
    "on_train_begin", "on_epoch_begin", "on_train_batch_begin",
    "on_train_batch_end", "on_epoch_end", "on_train_end",
)


def configure_host(host):
    """"accel": TensorFlow's pools limited to one thread, leaving a core
    free. Call before TensorFlow runs its first op (the pools are created
    then)."""
    if host == "accel":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _rss_peak_bytes():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def build(width, layers, batch, seed=0):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,))
    x = inputs
    for _ in range(layers):
        x = keras.layers.Dense(width)(x)
    outputs = keras.layers.Dense(16)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", jit_compile=False)
    data = tf.data.Dataset.from_tensors(
        (tf.random.normal((batch, width)), tf.random.normal((batch, 16)))
    ).repeat()
    # Builds the optimizer and traces/caches train_function, so the measured
    # fits below all run the same, already-compiled step.
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    return model, data


def state_variables(model):
    seen, out = set(), []
    for v in list(model.variables) + list(model.optimizer.variables):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def state_bytes(model):
    import numpy as np

    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in state_variables(model)
    )


class Clock:
    """Two callbacks, one first and one last in the list: step boundaries.

    `device_s` > 0: the last callback sleeps that long at each batch end
    before taking the step's end time: a device step the host waits for
    (accelerator-like host mode), outside the hooks of the callback under
    test.
    """

    def __init__(self, device_s=0.0):
        import keras

        clock = self
        self.begin = []  # perf_counter at batch begin, before any callback
        self.end = []  # perf_counter at batch end, after every callback
        self.on_last_batch = None

        class First(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                clock.begin.append(time.perf_counter())

        class Last(keras.callbacks.Callback):
            def __init__(self, steps):
                super().__init__()
                self.steps = steps

            def on_train_batch_end(self, batch, logs=None):
                if device_s > 0:
                    time.sleep(device_s)
                clock.end.append(time.perf_counter())
                if batch == self.steps - 1 and clock.on_last_batch:
                    clock.on_last_batch()

        self.First, self.Last = First, Last


def time_hooks(callback):
    """Patches the instance's hooks to record (hook, batch, seconds)."""
    calls = []
    for name in _HOOKS:
        original = getattr(callback, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                batch = args[0] if args and isinstance(args[0], int) else None
                calls.append((_name, batch, time.perf_counter() - start,
                              start))

        setattr(callback, name, timed)
    return calls


def time_methods(obj, names, record):
    """Patches `obj.<name>` to append (name, start, seconds) to `record`.

    Defensive: keras_ckpt's internals may move (the benchmark must survive
    a refactor of src/); a missing object or method is skipped and its name
    returned, and the analysis reports "n/a" for what it would have timed.
    """
    missing = []
    for name in names:
        original = getattr(obj, name, None) if obj is not None else None
        if not callable(original):
            missing.append(name)
            continue

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                record.append((_name, start, time.perf_counter() - start))

        setattr(obj, name, timed)
    return missing


def make_callback(config, model, directory, save_freq):
    """Returns (callback, extra) for a configuration."""
    import keras
    import tensorflow as tf

    if config in ("kc_async", "kc_sync"):
        import keras_ckpt

        cb = keras_ckpt.Checkpoint(
            directory=directory, save_freq=save_freq,
            async_save=config == "kc_async", on_preemption=None, verbose=0,
            max_to_keep=2,
        )
        record = []
        missing = time_methods(getattr(cb, "_store", None),
                               ("write", "retain"), record)
        missing += time_methods(getattr(cb, "_writer", None),
                                ("wait_until_finished",), record)
        cb._bench_untimed = missing
        return cb, record
    if config == "tf_manager":
        ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)

        class TFManagerEvery(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seen = 0

            def on_train_batch_end(self, batch, logs=None):
                self.seen += 1
                if self.seen % save_freq == 0:
                    manager.save()

        callback = TFManagerEvery()
        callback.manager = manager
        return callback, None
    if config == "keras_backup":
        return keras.callbacks.BackupAndRestore(
            os.path.join(directory, "backup"), save_freq=save_freq
        ), None
    if config == "keras_mc_weights":
        return keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "model.weights.h5"), save_freq=save_freq,
            save_weights_only=True,
        ), None
    if config == "keras_mc_full":
        return keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "model.keras"), save_freq=save_freq,
        ), None
    raise ValueError(config)


def _checkpoint_bytes(config, directory, callback):
    """Bytes of the newest checkpoint (one, even when two are kept)."""
    if config == "tf_manager":
        prefix = callback.manager.latest_checkpoint
        folder, base = os.path.split(prefix)
        return sum(os.path.getsize(os.path.join(folder, f))
                   for f in os.listdir(folder) if f.startswith(base + "."))
    return _dir_bytes(directory)


def one_fit(config, model, data, args, tmp_root):
    """One fit with `config`'s callback ("none": without); its timings."""
    directory = tempfile.mkdtemp(prefix=f"{config}-", dir=tmp_root)
    steps = args.saves * args.save_freq + args.save_freq // 2
    clock = Clock(args.device_ms / 1000.0)
    callbacks, hooks, record, ckpt = [clock.First()], None, None, None
    if config != "none":
        ckpt, record = make_callback(config, model, directory, args.save_freq)
        hooks = time_hooks(ckpt)
        callbacks.append(ckpt)
    last = clock.Last(steps)
    callbacks.append(last)
    sizes = {}
    if config != "none" and not config.startswith("kc_"):
        # Size on disk once the last save of the loop is done; before
        # on_train_end (BackupAndRestore deletes its backup there).
        clock.on_last_batch = lambda: sizes.setdefault(
            "bytes", _checkpoint_bytes(config, directory, ckpt))

    gc.collect()
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=callbacks)
    returned = time.perf_counter()
    fit_s = returned - start

    begin, end = clock.begin, clock.end
    result = {
        "config": config,
        "steps": steps,
        "saves": args.saves,
        "fit_s": fit_s,
        # From the end of the last batch to fit() returning: on_train_end
        # (keras_ckpt: the final checkpoint committed and flushed).
        "after_last_batch_s": returned - end[-1],
        "loop_s": end[-1] - begin[0],
        "step_s": [e - b for b, e in zip(begin, end)],
        "step_begin": [b - start for b in begin],
    }
    if hooks is not None:
        loop_hooks = [c for c in hooks
                      if c[0] not in ("on_train_begin", "on_train_end")]
        per_batch = {}
        for name, batch, seconds, _ in loop_hooks:
            if batch is not None and name.startswith("on_train_batch"):
                per_batch[batch] = per_batch.get(batch, 0.0) + seconds
        result["hook_s"] = sum(c[2] for c in loop_hooks)
        result["hook_by_batch"] = per_batch
        result["train_begin_s"] = sum(
            c[2] for c in hooks if c[0] == "on_train_begin")
        result["train_end_s"] = sum(
            c[2] for c in hooks if c[0] == "on_train_end")
    if ckpt is not None and config.startswith("kc_"):
        result["untimed"] = getattr(ckpt, "_bench_untimed", [])
        try:
            manifest = ckpt.last_saved
            result["data_bytes"] = int(manifest.total_bytes)
            result["bytes"] = result["data_bytes"] + os.path.getsize(
                ckpt._store.manifest_path(manifest.name))
        except Exception:  # internals moved: fall back to the directory
            result["bytes"] = _dir_bytes(directory) // 2 or None
        # One entry per save: store.write (+ the retain that follows it).
        writes = [r for r in record if r[0] == "write"]
        retains = [r for r in record if r[0] == "retain"]
        result["write_s"] = [w[2] for w in writes]
        result["retain_s"] = [r[2] for r in retains]
        result["write_start"] = [w[1] - start for w in writes]
        # Time the training thread spent waiting for the writer: in the
        # loop (a save while the previous one is still being written) and
        # in on_train_end (the final flush).
        train_end_from = min(
            [c[3] for c in hooks if c[0] == "on_train_end"] or [float("inf")])
        waits = [r for r in record if r[0] == "wait_until_finished"]
        result["wait_in_loop_s"] = sum(
            w[2] for w in waits if w[1] < train_end_from)
        result["wait_at_end_s"] = sum(
            w[2] for w in waits if w[1] >= train_end_from)
        result["n_saves_total"] = len(writes)
    else:
        result["bytes"] = sizes.get("bytes")
    shutil.rmtree(directory, ignore_errors=True)
    return result


def floors(model, nbytes, tmp_root, repeats=3):
    """np.copy of the state, and raw write+fsync of as many bytes."""
    import numpy as np

    arrays = [np.asarray(v.numpy()) for v in state_variables(model)]
    copy_s = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        copies = [np.copy(a) for a in arrays]
        copy_s.append(time.perf_counter() - t)
        del copies
    write_s = []
    directory = tempfile.mkdtemp(prefix="raw-", dir=tmp_root)
    try:
        for i in range(repeats):
            path = os.path.join(directory, f"raw-{i}.bin")
            t = time.perf_counter()
            with open(path, "wb") as f:
                for a in arrays:
                    f.write(memoryview(a).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            write_s.append(time.perf_counter() - t)
            written = os.path.getsize(path)
            os.remove(path)  # as a rotating checkpoint directory would
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"copy_s": copy_s, "raw_write_s": write_s,
            "raw_write_bytes": written, "copy_bytes": nbytes}


def _versions():
    import platform

    import keras
    import numpy as np
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "numpy": np.__version__}
    try:
        import keras_ckpt

        out["keras_ckpt"] = getattr(keras_ckpt, "__version__", "?")
    except Exception as e:  # reported, not fatal for the other configs
        out["keras_ckpt"] = f"import failed: {e}"
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, choices=CONFIGS)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--save-freq", type=int, required=True)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--floor-repeats", type=int, default=3)
    p.add_argument("--tmp-root", required=True)
    p.add_argument("--host", choices=("cpu", "accel"), default="cpu")
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="accel: a device step of this length per batch")
    args = p.parse_args(argv)
    configure_host(args.host)
    if args.host != "accel":
        args.device_ms = 0.0

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    model, data = build(args.width, args.layers, args.batch)
    out = {
        "config": args.config,
        "state_bytes": state_bytes(model),
        "params": int(model.count_params()),
        "setup_s": time.perf_counter() - t0,
        "host": args.host, "device_ms": args.device_ms,
        "versions": _versions(),
        "runs": [],
    }
    # Paired design: a fit without checkpoints right before each fit with
    # them, in the same process, so that drift in the machine's speed (other
    # load, memory placement) cancels out of the difference.
    for _ in range(args.repeats):
        if args.config != "none":
            out["runs"].append(one_fit("none", model, data, args,
                                       args.tmp_root))
        out["runs"].append(one_fit(args.config, model, data, args,
                                   args.tmp_root))
    out["peak_rss_bytes"] = _rss_peak_bytes()
    if args.config == "none":
        out["floors"] = floors(model, out["state_bytes"], args.tmp_root,
                               args.floor_repeats)
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    # Set here, not at import: a process that imports this module (the
    # tests, preemption.py) must not pass them on to its own subprocesses.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
