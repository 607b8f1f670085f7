"""keras_ckpt quick start: train, get preempted, resume on a "new machine", export.

    python examples/quickstart.py [--workdir demo] [--mirror URL]

1. Trains a small classifier with `keras_ckpt.Checkpoint` mirroring every
   checkpoint to `--mirror` (a local `file://` folder by default; any
   `s3://`, `gs://` or `az://` URL works the same).
2. Halfway through an epoch the job receives SIGTERM, as a spot/preemptible
   VM does: keras_ckpt saves at the next batch, flushes the mirror, and the
   process exits with status 143.
3. The local checkpoint folder is deleted (the VM and its disk are gone), and
   the same command runs again: it resumes from the mirror at the same epoch
   and batch, finishes, and `ExportSavedModel` writes a servable SavedModel.
4. An uninterrupted run of the same job is trained for comparison: the
   resumed run's final weights must be bitwise identical, and the exported
   SavedModel must compute what the trained model computes.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

EPOCHS = 3
BATCHES_PER_EPOCH = 40
PREEMPT_AT_STEP = 57  # epoch 1, batch 17


def train(args):
    """One training job: what a user's script looks like."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    import keras

    import keras_ckpt

    keras.utils.set_random_seed(42)
    rng = np.random.RandomState(0)
    x = rng.normal(size=(BATCHES_PER_EPOCH * 16, 10)).astype("float32")
    y = (x[:, :5].sum(axis=1) > x[:, 5:].sum(axis=1)).astype("int32")
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    val_ds = tf.data.Dataset.from_tensor_slices((x[:128], y[:128])).batch(64)

    model = keras.Sequential([
        keras.Input((10,), name="features"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.ExponentialDecay(1e-2, 20, 0.9)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5)
    ckpt = keras_ckpt.Checkpoint(
        directory=args.ckpt_dir, mirror=args.mirror, save_freq=25,
        max_to_keep=2, monitor="val_loss", keep_best=1,
        state={"early_stopping": stopper})
    callbacks = [ckpt, stopper,
                 keras_ckpt.ExportSavedModel(args.export_dir, source="latest")]
    if args.preempt_at_step:
        callbacks.append(_SimulatedPreemption(ckpt, args.preempt_at_step))
    model.fit(train_ds, epochs=EPOCHS, validation_data=val_ds,
              callbacks=callbacks, verbose=2, shuffle=False)
    np.savez(args.weights_out,
             *[np.asarray(v) for v in model.variables + model.optimizer.variables])
    probe = x[:8]
    with open(args.weights_out + ".json", "w") as f:
        json.dump({"probe": probe.tolist(),
                   "predictions": model.predict(probe, verbose=0).tolist()}, f)


def _SimulatedPreemption(ckpt, step):
    import keras

    class SimulatedPreemption(keras.callbacks.Callback):
        """Sends this process SIGTERM, as a cloud provider does on preemption."""

        def on_train_batch_end(self, batch, logs=None):
            if ckpt._step == step:
                print(f"\n>>> simulating preemption: SIGTERM at step {step}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

    return SimulatedPreemption()


def run_job(label, **kwargs):
    command = [sys.executable, __file__, "--job"]
    for key, value in kwargs.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    print(f"\n=== {label} ===\n$ {' '.join(command[1:])}", flush=True)
    start = time.monotonic()
    code = subprocess.call(command)
    print(f"=== exit status {code} after {time.monotonic() - start:.1f} s ===",
          flush=True)
    return code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo")
    parser.add_argument("--mirror", default=None,
                        help="mirror URL (default: file://<workdir>/mirror)")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--export-dir")
    parser.add_argument("--weights-out")
    parser.add_argument("--preempt-at-step", type=int, default=0)
    args = parser.parse_args()
    if args.job:
        return train(args)

    workdir = os.path.abspath(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    mirror = args.mirror or f"file://{workdir}/mirror"
    ckpt_dir = os.path.join(workdir, "vm-disk", "checkpoints")
    export_dir = os.path.join(workdir, "export")
    job = dict(ckpt_dir=ckpt_dir, mirror=mirror, export_dir=export_dir,
               weights_out=os.path.join(workdir, "resumed.npz"))

    code = run_job("1. train until the VM is preempted", **job,
                   preempt_at_step=PREEMPT_AT_STEP)
    assert code == 143, f"expected exit status 143 after SIGTERM, got {code}"
    assert not os.path.exists(export_dir), "a preempted run must not export"

    shutil.rmtree(os.path.join(workdir, "vm-disk"))
    print("\n>>> the VM is gone: deleted its local checkpoint folder")
    code = run_job("2. same command on a fresh VM: resume from the mirror", **job)
    assert code == 0, code

    reference = dict(ckpt_dir=os.path.join(workdir, "reference-ckpts"),
                     mirror=f"file://{workdir}/reference-mirror",
                     export_dir=os.path.join(workdir, "reference-export"),
                     weights_out=os.path.join(workdir, "reference.npz"))
    code = run_job("3. the same job without interruption, for comparison",
                   **reference)
    assert code == 0, code
    return report(workdir, export_dir)


def report(workdir, export_dir):
    import numpy as np
    import tensorflow as tf

    resumed = np.load(os.path.join(workdir, "resumed.npz"))
    reference = np.load(os.path.join(workdir, "reference.npz"))
    identical = all(np.array_equal(resumed[k], reference[k])
                    for k in reference.files)
    with open(os.path.join(workdir, "resumed.npz.json")) as f:
        expected = json.load(f)
    served = tf.saved_model.load(os.path.join(export_dir, "1"))
    outputs = served.signatures["serving_default"](
        features=tf.constant(expected["probe"], tf.float32))
    predictions = next(iter(outputs.values())).numpy()
    serves_same = np.allclose(predictions, expected["predictions"], atol=1e-6)

    import keras_ckpt

    print("\n=== summary ===")
    for info in keras_ckpt.list_checkpoints(f"file://{workdir}/mirror"):
        val_loss = info.metrics.get("val_loss")
        print(f"mirror: {info.name:>8}  epoch {info.epoch} batch {info.batch:>2}"
              f"  complete={info.complete}"
              + (f"  val_loss={val_loss:.4f}" if val_loss is not None else ""))
    print(f"resumed run bitwise identical to uninterrupted run: {identical}")
    print(f"SavedModel at {export_dir}/1 serves the trained model: {serves_same}")
    return 0 if identical and serves_same else 1


if __name__ == "__main__":
    sys.exit(main())
