"""A small deterministic training job under `tf.distribute`, for the tests.

Two modes:

- `--strategy mirrored`: Keras 3 with `MirroredStrategy` over two logical
  CPU devices in this one process.
- `--strategy multiworker`: `tf_keras` (run with `TF_USE_LEGACY_KERAS=1`)
  with `MultiWorkerMirroredStrategy`; the cluster and this worker's task come
  from `TF_CONFIG`, as SageMaker and Vertex AI set it.

Run it twice with the same arguments: the first run may be killed
(`--kill-at-step`: SIGKILL to this process, or to the whole process group of
the job when this worker is the chief), or get SIGTERM (`--sigterm-at-step`,
on the worker `--sigterm-worker`); the second resumes. `--out` gets this
worker's final variables (`<out>.<worker>.npz`) and a JSON record, to compare
bitwise with an uninterrupted run.
"""

import argparse
import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["mirrored", "multiworker", "none"],
                   required=True)
    p.add_argument("--plateau", action="store_true",
                   help="a ReduceLROnPlateau callback, passed in `state=`")
    p.add_argument("--replicas", type=int, choices=[1, 2], default=2,
                   help="devices of the MirroredStrategy (same global batch)")
    p.add_argument("--dir", required=True)
    p.add_argument("--out")
    p.add_argument("--mirror")
    p.add_argument("--save-freq", default="5")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--sigterm-at-step", type=int)
    p.add_argument("--sigterm-worker", type=int, default=1,
                   help="the worker that gets SIGTERM, -1 for all of them")
    p.add_argument("--export")
    p.add_argument("--units", type=int, default=16)
    p.add_argument("--hidden", type=int, default=0,
                   help="add a Dense(hidden) layer (to make the state large)")
    p.add_argument("--batch-sleep", type=float, default=0.0)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--spy-uploads",
                   help="log every write to the file:// mirror to this file")
    return p.parse_args()


def main():
    args = parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    if args.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras

        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"][:args.replicas])
        worker = 0
    elif args.strategy == "multiworker":
        assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
        keras = tf.keras  # tf_keras
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        worker = strategy.cluster_resolver.task_id
    else:
        keras = tf.keras  # tf_keras with TF_USE_LEGACY_KERAS=1, else Keras 3
        strategy = tf.distribute.get_strategy()
        worker = 0
    import keras_ckpt

    keras.utils.set_random_seed(1234)
    x = np.random.RandomState(0).rand(args.batches * 12, 8).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 4).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    val = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(12)

    with strategy.scope():
        layers = [keras.Input((8,)), keras.layers.Dense(args.units, activation="relu")]
        if args.hidden:
            layers.append(keras.layers.Dense(args.hidden, activation="relu"))
        if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
            # Keras 3's dropout RNG state is a variable, saved and restored;
            # tf_keras' default dropout RNG has no state to save.
            layers.append(keras.layers.Dropout(0.3))
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
        model = keras.Sequential(layers)
        lr = 0.05 if args.plateau else (
            keras.optimizers.schedules.ExponentialDecay(0.05, 5, 0.9))
        model.compile(optimizer=keras.optimizers.Adam(lr),
                      loss="binary_crossentropy", metrics=["accuracy"])

    save_freq = args.save_freq if args.save_freq == "epoch" else int(
        args.save_freq)
    mirror = args.mirror
    if args.spy_uploads:
        mirror = _spying_uploader(args.mirror, args.spy_uploads, worker)
    state, extra = {}, []
    if args.plateau:
        # min_delta=10: the LR halves at every epoch end.
        state["plateau"] = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=0, min_delta=10.0)
        extra.append(state["plateau"])
    ckpt = keras_ckpt.Checkpoint(
        directory=args.dir, mirror=mirror, save_freq=save_freq,
        max_to_keep=2, async_save=not args.sync, state=state, verbose=1)
    timings = _time_saves(ckpt)
    callbacks = [ckpt, *extra]
    exporter = None
    if args.export:
        exporter = keras_ckpt.ExportSavedModel(export_dir=args.export)
        callbacks.append(exporter)
    if args.batch_sleep:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: time.sleep(args.batch_sleep)))
    callbacks.append(keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: _maybe_signal(args, ckpt, worker)))
    history = model.fit(ds, epochs=args.epochs, validation_data=val,
                        verbose=0, shuffle=False, callbacks=callbacks)
    if args.out:
        values = list(model.variables) + list(model.optimizer.variables)
        np.savez(f"{args.out}.{worker}.npz",
                 **{f"v{i}": np.asarray(v) for i, v in enumerate(values)})
        record = {
            "history": history.history,
            "epochs": history.epoch,
            "preempted": ckpt.preempted,
            "restored": getattr(ckpt.restored, "name", None),
            "last_saved": getattr(ckpt.last_saved, "name", None),
            "lr": float(np.asarray(model.optimizer.learning_rate)),
            "plateau": {k: float(getattr(state["plateau"], k)) for k in
                        ("wait", "cooldown_counter", "best")}
            if args.plateau else None,
            "timings": timings,
        }
        if args.export:
            probe = np.random.RandomState(1).rand(4, 8).astype("float32")
            loaded = tf.saved_model.load(exporter.exported_to)
            # The same batch on one device on both sides: `predict` under
            # MirroredStrategy splits it across the replicas, and a 2-row
            # matmul differs from a 4-row one in the last bit on this CPU.
            record["export_matches"] = bool(np.array_equal(
                loaded.serve(tf.constant(probe)).numpy(),
                np.asarray(model(tf.constant(probe), training=False))))
        with open(f"{args.out}.{worker}.json", "w") as f:
            json.dump(record, f, default=float)
    return 0


def _spying_uploader(url, log_path, worker):
    """The file:// uploader, logging which worker writes what to the mirror."""
    from keras_ckpt.store.local import LocalStore

    class SpyingUploader(LocalStore):
        def _log(self, what, name):
            with open(log_path, "a") as f:
                f.write(f"{worker} {what} {name}\n")

        def _upload_file(self, local_path, name, progress=None):
            self._log("upload", name)
            return super()._upload_file(local_path, name, progress)

        def _write_bytes(self, name, data, if_absent=False):
            self._log("write", name)
            return super()._write_bytes(name, data, if_absent)

        def _delete(self, name):
            self._log("delete", name)
            return super()._delete(name)

    return SpyingUploader(url)


def _maybe_signal(args, ckpt, worker):
    step = ckpt._step
    if args.kill_at_step is not None and step >= args.kill_at_step and (
        ckpt.last_saved is not None  # the chief committed one
    ):
        sys.stdout.flush()
        if args.strategy == "multiworker":
            # The whole job at once, as when its machines are reclaimed.
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if args.sigterm_at_step is not None and step == args.sigterm_at_step and (
        args.sigterm_worker in (worker, -1)  # -1: every worker
    ):
        print(f"SIGTERM at {time.time():.6f}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


def _time_saves(ckpt):
    """Records how long each save blocks training, and each background write."""
    timings = {"blocking": [], "write": []}
    save = ckpt._save

    def timed_save(*args, **kwargs):
        before = ckpt._saved_step
        start = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            if ckpt._saved_step != before:
                timings["blocking"].append(time.perf_counter() - start)

    ckpt._save = timed_save
    run = ckpt._writer._run

    def timed_run(job):
        run(job)
        if ckpt._writer.last_duration is not None:
            timings["write"].append(ckpt._writer.last_duration)

    ckpt._writer._run = timed_run
    return timings


if __name__ == "__main__":
    sys.exit(main())
