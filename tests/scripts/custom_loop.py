"""A deterministic GradientTape training loop on `keras_ckpt.CheckpointManager`.

The custom-loop twin of train.py: run it twice with the same arguments; the
first run may be SIGKILLed (`--kill-at-step`), the second resumes. `--out`
gets the final model and optimizer variables, to compare bitwise with an
uninterrupted run.
"""

import argparse
import json
import os
import signal
import sys

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
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--steps-per-epoch", type=int, default=12)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--sigterm-at-step", type=int)
    p.add_argument("--on-preemption", default="exit")
    p.add_argument("--sync", action="store_true")
    return p.parse_args()


def main():
    args = parse_args()
    keras.utils.set_random_seed(1234)
    x = np.random.RandomState(0).rand(96, 8).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 4).astype("float32")
    ds = (tf.data.Dataset.from_tensor_slices((x, y))
          .shuffle(96, seed=7).batch(8).repeat())
    iterator = iter(ds)

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.05, 5, 0.9))
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.BinaryCrossentropy()

    manager = keras_ckpt.CheckpointManager(
        args.dir, model=model,
        state={"optimizer": optimizer, "data": iterator},
        save_policy=keras_ckpt.SaveEveryNSteps(args.save_every),
        keep=keras_ckpt.KeepLast(2), async_save=not args.sync,
        on_preemption=args.on_preemption)
    start = manager.restore_or_initialize()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    for step in range(start.step, args.steps):
        loss = train_step(*next(iterator))
        manager.step({"loss": float(loss)})
        if (step + 1) % args.steps_per_epoch == 0:
            manager.end_epoch({"loss": float(loss)})
        if (args.kill_at_step is not None and step + 1 >= args.kill_at_step
                and manager.last_saved is not None):
            os.kill(os.getpid(), signal.SIGKILL)
        if step + 1 == args.sigterm_at_step:
            # Handled by the next manager.step(): one more step is trained.
            os.kill(os.getpid(), signal.SIGTERM)
        if manager.reached_preemption:  # on_preemption="stop"
            break
    manager.close()
    if args.out:
        arrays = {f"v{i}": np.asarray(v) for i, v in
                  enumerate(model.variables + optimizer.variables)}
        np.savez(args.out, **arrays)
        with open(args.out + ".json", "w") as f:
            json.dump({"next_batch": np.asarray(next(iterator)[0]).tolist(),
                       "step": manager.position.step,
                       "preempted": manager.reached_preemption}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
