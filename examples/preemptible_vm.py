"""A training job for a spot / preemptible VM, mirrored to GCS, S3 or Azure.

Checkpoints are written to the VM's disk (`./checkpoints`, or
`$KERAS_CKPT_DIR`) and mirrored in the background to `--mirror`. On SIGTERM
(the cloud's preemption notice: about 30 s on GCP and Azure, 120 s on AWS)
`keras_ckpt` saves at the next batch, flushes the mirror and exits with
status 143. Run the same command again, on the same VM or on a fresh one
whose disk is empty, and it resumes from the newest complete checkpoint at
the same epoch and batch; when training completes it exports a SavedModel
to `--export-dir` and exits with status 0.

So run it under a restart loop, which stops once the job has finished:

    until python preemptible_vm.py --mirror gs://my-bucket/run-1; do
        echo "interrupted (exit status $?), restarting in 5 s"; sleep 5
    done

(On a VM that is stopped by the preemption, put that loop in the VM's
startup script, or in a systemd unit with `Restart=on-failure`.)

    python examples/preemptible_vm.py                       # mirror: file://$PWD/mirror
    python examples/preemptible_vm.py --mirror s3://my-bucket/run-1   # pip install 'keras-ckpt[s3]'
    python examples/preemptible_vm.py --mirror gs://my-bucket/run-1   # pip install 'keras-ckpt[gcs]'
    python examples/preemptible_vm.py --mirror az://container/run-1   # pip install 'keras-ckpt[azure]'

Try a preemption by hand (`--step-delay` slows training down so there is
time to send the signal):

    python examples/preemptible_vm.py --step-delay 0.05 & sleep 10
    kill -TERM $!; wait $!; echo "exit status $?"           # 143
    rm -rf checkpoints                                       # the VM's disk is gone
    python examples/preemptible_vm.py                        # resumed from the mirror
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--mirror", default=None,
        help="gs://, s3://, az:// or file:/// URL checkpoints are mirrored to "
             "(default: file:// URL of ./mirror)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="local checkpoint directory (default: "
                             "$KERAS_CKPT_DIR or ./checkpoints)")
    parser.add_argument("--export-dir", default="export",
                        help="where the SavedModel goes (<dir>/1/); a URL works too")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-freq", type=int, default=10,
                        help="save every N batches")
    parser.add_argument("--save-every-seconds", type=float, default=300,
                        help="and at least every N seconds")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="sleep this long after each batch (to try "
                             "`kill -TERM` by hand)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mirror is None:
        # keras_ckpt takes absolute file:// URLs only ("file:///abs/path").
        args.mirror = pathlib.Path("mirror").absolute().as_uri()
    return args


def make_dataset(batch_size, steps_per_epoch, seed):
    rng = np.random.default_rng(seed)
    n = batch_size * steps_per_epoch
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (np.sin(x[:, :4].sum(axis=1)) > 0).astype("int32")
    # Same order in every epoch and every process, so that a resumed epoch
    # skips exactly the batches it had already trained on.
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(n, seed=seed, reshuffle_each_iteration=False)
            .batch(batch_size))


def build_model():
    model = keras.Sequential([
        keras.Input((8,), name="features"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(2, activation="softmax"),
    ])
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=500)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    model = build_model()
    ckpt = keras_ckpt.Checkpoint(
        directory=args.checkpoint_dir,
        mirror=args.mirror,
        save_freq=args.save_freq,
        save_every_seconds=args.save_every_seconds,
        max_to_keep=3,
        on_preemption="exit",  # SIGTERM: save, flush the mirror, exit 143
    )
    callbacks = [ckpt, keras_ckpt.ExportSavedModel(args.export_dir)]
    if args.step_delay:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: time.sleep(args.step_delay)))
    model.fit(make_dataset(args.batch_size, args.steps_per_epoch, args.seed),
              epochs=args.epochs, verbose=2, callbacks=callbacks)
    latest = keras_ckpt.list_checkpoints(args.mirror)[-1]
    print(f"done: the mirror {args.mirror} holds step {latest.step} (epoch "
          f"{latest.epoch}, batch {latest.batch}, complete={latest.complete})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
