"""Vertex AI custom training task with keras_ckpt (Spot VM ready).

The same file runs on your laptop and as a Vertex AI CustomJob; it names no
path. With a `base_output_dir`, Vertex AI sets `AIP_CHECKPOINT_DIR` and
`AIP_MODEL_DIR`, and `keras_ckpt` uses them:

- checkpoints: on Vertex AI, written to a local temp dir and mirrored in
  the background to `$AIP_CHECKPOINT_DIR` (`<base_output_dir>/checkpoints`),
  from which a job restarted on a fresh VM resumes; `./checkpoints` (no
  mirror) locally.
- exported model: on Vertex AI, uploaded to `$AIP_MODEL_DIR` with
  `saved_model.pb` at the root (no version dir) and uploaded last, as
  `aiplatform.Model.upload(artifact_uri=...)` and the prebuilt prediction
  containers expect; `./export/1/` locally.

(`KERAS_CKPT_DIR` / `KERAS_CKPT_MIRROR` override the checkpoint directory and
the mirror, anywhere; the `gs://` mirror needs `pip install 'keras-ckpt[gcs]'`.)

Run it locally (CPU, synthetic data, a few seconds):

    python examples/vertex/task.py --epochs 3

Submit it to Vertex AI with `submit.py` next to this file: it passes
`--epochs` etc. as `args`, and asks for Spot VMs. On a Spot preemption the VM
gets about 30 s of notice (SIGTERM): `keras_ckpt` saves at the next batch,
finishes the upload within its 25 s budget and exits with status 143; Vertex
AI restarts the job and this script resumes from the mirror at the same
epoch and batch.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402

N_FEATURES = 4  # the docs' `endpoint.predict(instances=[[0.1, 0.2, 0.3, 0.4]])`


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32)
    parser.add_argument("--steps_per_epoch", "--steps-per-epoch", type=int,
                        default=50, help="size of the synthetic data set, in batches")
    parser.add_argument("--learning_rate", "--learning-rate", type=float,
                        default=1e-2)
    parser.add_argument("--save_freq", "--save-freq", type=int, default=20,
                        help="save a checkpoint every N batches (and at the end)")
    parser.add_argument("--save_every_seconds", "--save-every-seconds",
                        type=float, default=300,
                        help="...and at least every N seconds of training")
    parser.add_argument("--seed", type=int, default=42)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"ignoring unknown arguments: {unknown}", flush=True)
    return args


def make_datasets(batch_size, steps_per_epoch, seed):
    """Synthetic binary classification. Replace with your data (read it from
    `gs://...` with `tf.data`, or from the `/gcs/<bucket>/...` FUSE mount)."""
    rng = np.random.default_rng(seed)
    n_train = batch_size * steps_per_epoch
    x = rng.normal(size=(n_train + 256, N_FEATURES)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], "float32") > 0).astype("float32")
    # A resumed run skips the batches of the interrupted epoch that were
    # already trained on, so each epoch must have the same order in a new
    # process: shuffle with a fixed seed, not reshuffled per iteration.
    train = (tf.data.Dataset.from_tensor_slices((x[:n_train], y[:n_train]))
             .shuffle(n_train, seed=seed, reshuffle_each_iteration=False)
             .batch(batch_size))
    val = tf.data.Dataset.from_tensor_slices((x[n_train:], y[n_train:])).batch(128)
    return train, val


def build_model(learning_rate):
    model = keras.Sequential([
        keras.Input((N_FEATURES,), name="features"),  # the serving input name
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="binary_crossentropy", metrics=["accuracy"])
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    train, val = make_datasets(args.batch_size, args.steps_per_epoch, args.seed)
    model = build_model(args.learning_rate)

    # EarlyStopping's counters travel with the checkpoint, so a job restarted
    # after a preemption does not start its patience over.
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=3, restore_best_weights=False)
    ckpt = keras_ckpt.Checkpoint(
        save_freq=args.save_freq,  # no directory, no mirror: platform preset
        save_every_seconds=args.save_every_seconds,
        monitor="val_loss",        # also keep the best checkpoint by val_loss
        state={"early_stopping": early_stopping},
        # If SIGTERM may not reach Python (a shell entry point in a custom
        # container), also poll the GCE metadata server:
        # preemption_watch=("gce",),
    )
    model.fit(train, epochs=args.epochs, validation_data=val, verbose=2,
              callbacks=[ckpt, early_stopping, keras_ckpt.ExportSavedModel()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
