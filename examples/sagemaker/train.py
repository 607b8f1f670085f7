"""Amazon SageMaker training entry point with keras_ckpt (managed spot ready).

The same file runs on your laptop and as a SageMaker training job; it names no
path. `keras_ckpt` reads the environment SageMaker sets up:

- checkpoints: `/opt/ml/checkpoints` on SageMaker, which SageMaker syncs to
  the estimator's `checkpoint_s3_uri` and restores after a spot
  interruption; `./checkpoints` locally.
- exported model: `$SM_MODEL_DIR/1/saved_model.pb` (`/opt/ml/model/1/`) on
  SageMaker, what its TensorFlow Serving container loads; `./export/1/`
  locally.

(`KERAS_CKPT_DIR` / `KERAS_CKPT_MIRROR` override the checkpoint directory and
add a mirror, anywhere.)

Run it locally (CPU, synthetic data, a few seconds):

    python examples/sagemaker/train.py --epochs 3

Run it again with more epochs and it continues where it stopped; interrupt it
(Ctrl-C is not a preemption, `kill -TERM <pid>` is) and it saves, exits with
status 143 and resumes at the same batch on the next run. Submit it to
SageMaker with `launch.py` next to this file.

SageMaker passes the estimator's `hyperparameters` as command-line arguments
(`--epochs 20 --batch_size 64`), and the TensorFlow estimator adds
`--model_dir s3://...` of its own: it is accepted and ignored here (the model
goes to `$SM_MODEL_DIR`).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402

N_FEATURES = 4  # the docs' `predictor.predict({"instances": [[0.1, 0.2, 0.3, 0.4]]})`


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
    parser.add_argument("--seed", type=int, default=42)
    # Added by SageMaker's TensorFlow estimator; the export goes to
    # $SM_MODEL_DIR instead, which SageMaker packs into model.tar.gz.
    parser.add_argument("--model_dir", "--model-dir", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"ignoring unknown arguments: {unknown}", flush=True)
    return args


def make_datasets(batch_size, steps_per_epoch, seed):
    """Synthetic binary classification. Replace with your data: SageMaker
    copies the channel `train` of `estimator.fit({"train": "s3://..."})` to
    `$SM_CHANNEL_TRAIN`."""
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

    # Callback state travels with the checkpoint: a resumed run keeps the
    # plateau counters and the reduced learning rate.
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.5, patience=2)
    ckpt = keras_ckpt.Checkpoint(
        save_freq=args.save_freq,  # no directory, no mirror: platform preset
        monitor="val_loss",        # also keep the best checkpoint by val_loss
        state={"reduce_lr": reduce_lr},
    )
    model.fit(train, epochs=args.epochs, validation_data=val, verbose=2,
              callbacks=[ckpt, reduce_lr, keras_ckpt.ExportSavedModel()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
