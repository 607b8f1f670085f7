"""A `tf.GradientTape` training loop that survives preemption.

`keras_ckpt.CheckpointManager` is the engine under the `Checkpoint` callback;
a custom loop drives it directly. Run this script, stop it at any moment
(Ctrl-C, SIGTERM, or `--preempt-at-step 30` to simulate a spot VM's notice),
run the same command again: it resumes at the step it stopped at, with the
same weights, optimizer state, dropout RNG and input position, and ends with
the same weights as an uninterrupted run (`--reference` prints both).

    python examples/custom_loop.py --preempt-at-step 30   # exits 143
    python examples/custom_loop.py                        # resumes, finishes

Checkpoints go to ./checkpoints and are mirrored to the `file://` directory
./mirror (use s3://, gs:// or az:// on a cloud machine): delete
./checkpoints between the two runs and the second one resumes from the
mirror, as a fresh machine would.
"""

import argparse
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Bitwise-reproducible kernels, so that a resumed run can be compared with
# an uninterrupted one (keras_ckpt resumes exactly either way).
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402

import keras_ckpt  # noqa: E402

STEPS = 60


def train(directory, mirror, preempt_at_step=None, verbose=1):
    """Trains for STEPS steps (resuming if `directory` or `mirror` holds a
    checkpoint); returns the final weights."""
    keras.utils.set_random_seed(1234)
    x = np.random.RandomState(0).rand(256, 8).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 4).astype("float32")
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(256, seed=7).batch(16).repeat())
    iterator = iter(dataset)

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.01, 20, 0.9))
    optimizer.build(model.trainable_variables)  # its slots exist to restore
    loss_fn = keras.losses.BinaryCrossentropy()

    manager = keras_ckpt.CheckpointManager(
        directory, mirror, model=model,
        state={"optimizer": optimizer, "data": iterator},
        save_policy=keras_ckpt.SaveEveryNSteps(10),
        keep=keras_ckpt.KeepLast(3), verbose=verbose)
    start = manager.restore_or_initialize()  # Position(step, epoch, batch)

    @tf.function
    def train_step(features, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    for step in range(start.step, STEPS):
        loss = train_step(*next(iterator))
        manager.step({"loss": float(loss)})  # saves when the policy says so
        if step + 1 == preempt_at_step:
            # What a spot VM's notice does: the next manager.step() saves,
            # flushes the mirror and exits with status 143.
            os.kill(os.getpid(), signal.SIGTERM)
    manager.close()  # the final checkpoint, committed and mirrored
    return [np.asarray(v) for v in model.variables]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="checkpoints")
    parser.add_argument("--mirror",
                        default="file://" + os.path.abspath("mirror"))
    parser.add_argument("--preempt-at-step", type=int)
    parser.add_argument("--reference", action="store_true",
                        help="also train uninterrupted in a scratch "
                             "directory and say whether the weights match")
    args = parser.parse_args()
    weights = train(args.dir, args.mirror, args.preempt_at_step)
    print(f"trained {STEPS} steps; checkpoints: "
          f"{[i.name for i in keras_ckpt.list_checkpoints(args.dir)]}")
    if args.reference:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            reference = train(os.path.join(scratch, "ckpt"), None, verbose=0)
        same = all(np.array_equal(a, b) for a, b in zip(weights, reference))
        print(f"bitwise equal to an uninterrupted run: {same}")


if __name__ == "__main__":
    main()
