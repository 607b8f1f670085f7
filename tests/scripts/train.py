"""A small, deterministic training job used by the end-to-end tests.

Run it twice with the same arguments: the first run may be killed (SIGKILL at
`--kill-at-step`, or SIGTERM from the test), the second resumes. `--out` gets
the final model+optimizer variables and the history, to compare bitwise with
an uninterrupted run.
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

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402

import keras_ckpt  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--dir")
    p.add_argument("--out")
    p.add_argument("--mirror")
    p.add_argument("--save-freq", default="epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--lr", choices=["schedule", "plateau"], default="schedule")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-mid-write",
                   help="SIGKILL from the writer once it has written the first "
                        "chunk of this checkpoint's data file (e.g. ckpt-15)")
    p.add_argument("--sigterm-at-step", type=int)
    p.add_argument("--spe", type=int, default=1)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--on-preemption", default="exit")
    p.add_argument("--units", type=int, default=16)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--preset", action="store_true",
                   help="directory/mirror from the platform preset, and export")
    p.add_argument("--batch-sleep", type=float, default=0.0)
    p.add_argument("--grace", type=float, default=25.0,
                   help="preemption_grace_seconds")
    p.add_argument("--hidden", type=int, default=0,
                   help="add a Dense(hidden) layer (to make the state large)")
    return p.parse_args()


def kill_mid_write(name):
    """The machine vanishes in the middle of writing checkpoint `name`: the
    writer's data-file sink SIGKILLs the process after its first chunk."""
    from keras_ckpt import bundle

    open_sink = bundle._open_sink

    def killing_sink(path):
        sink = open_sink(path)
        if os.path.basename(path) != name + bundle.DATA_SUFFIX:
            return sink
        write = sink.write

        def write_then_die(chunk):
            write(chunk)
            os.kill(os.getpid(), signal.SIGKILL)

        sink.write = write_then_die
        return sink

    bundle._open_sink = killing_sink


class Killer(keras.callbacks.Callback):
    """Kills this process after global batch `step` (counted across runs)."""

    def __init__(self, ckpt, kill_at, sig):
        super().__init__()
        self.ckpt, self.kill_at, self.sig = ckpt, kill_at, sig

    def on_train_batch_end(self, batch, logs=None):
        # Only once a checkpoint has committed, so that there is one to
        # resume from (a save may still be in flight: that one is lost).
        if (self.kill_at is not None and self.ckpt._step >= self.kill_at
                and self.ckpt.last_saved is not None):
            os.kill(os.getpid(), self.sig)


def main():
    args = parse_args()
    keras.utils.set_random_seed(1234)
    x = np.random.RandomState(0).rand(args.batches * 8, 8).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 4).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    val = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16)

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(args.units, activation="relu"),
        *([keras.layers.Dense(args.hidden, activation="relu")] if args.hidden else []),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    if args.lr == "schedule":
        lr = keras.optimizers.schedules.ExponentialDecay(0.05, 5, 0.9)
    else:
        lr = 0.05
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=["accuracy"], steps_per_execution=args.spe)
    callbacks_state = {}
    extra = []
    if args.lr == "plateau":
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor="loss", factor=0.5, patience=0, min_delta=10.0, verbose=0)
        callbacks_state["plateau"] = plateau
        extra.append(plateau)
    if args.early_stopping:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=50)
        callbacks_state["stopper"] = stopper
        extra.append(stopper)
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    ckpt = keras_ckpt.Checkpoint(
        directory=None if args.preset else args.dir,
        mirror=None if args.preset else args.mirror, save_freq=save_freq,
        max_to_keep=2, monitor="val_loss", keep_best=1, state=callbacks_state,
        # The tests kill this job at steps chosen for a save every
        # `--save-freq` batches only, without the epoch-end saves `monitor`
        # adds by default.
        save_on_epoch_end=False,
        async_save=not args.sync, on_preemption=args.on_preemption,
        resume=not args.no_resume, verbose=1,
        preemption_grace_seconds=args.grace,
    )
    if args.kill_mid_write:
        kill_mid_write(args.kill_mid_write)
    kill_at = args.kill_at_step if args.kill_at_step is not None else args.sigterm_at_step
    sig = signal.SIGKILL if args.kill_at_step is not None else signal.SIGTERM
    if args.preset:
        extra.append(keras_ckpt.ExportSavedModel())
    if args.batch_sleep:
        extra.append(keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: time.sleep(args.batch_sleep)))
    history = model.fit(ds, epochs=args.epochs, validation_data=val, verbose=0, shuffle=False,
                        callbacks=[ckpt, *extra, Killer(ckpt, kill_at, sig)])
    if args.out:
        arrays = {f"v{i}": np.asarray(v) for i, v in
                  enumerate(model.variables + model.optimizer.variables)}
        np.savez(args.out, **arrays)
        with open(args.out + ".json", "w") as f:
            json.dump({"history": history.history, "epochs": history.epoch,
                       "preempted": ckpt.preempted,
                       "lr": float(np.asarray(model.optimizer.learning_rate)),
                       "predictions": model.predict(
                           np.random.RandomState(0).rand(4, 8).astype("float32"),
                           verbose=0).tolist(),
                       "state": {k: {a: (float(getattr(v, a)) if isinstance(getattr(v, a, None), (int, float)) else None)
                                     for a in ("wait", "cooldown_counter", "best")}
                                 for k, v in callbacks_state.items()}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
