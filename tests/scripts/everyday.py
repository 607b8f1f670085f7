"""Everyday Keras training jobs, to check that a killed-and-resumed run ends
exactly like an uninterrupted one (tests/test_everyday_jobs.py).

    python everyday.py --job JOB --dir CKPT_DIR --out OUT.npz [--kill-at-step K]

`--kill-at-step K` SIGKILLs the process once the global step reaches K and a
checkpoint has committed. Running the same command again resumes. `--out`
gets every variable (model, every optimizer) and, in OUT.npz.json, the
History, what the user's callbacks recorded (a batch counter, the CSVLogger
file, the TensorBoard scalars).
"""

import argparse
import glob
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if __name__ == "__main__":  # also imported by tests, for GAN
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402

import keras_ckpt  # noqa: E402

JOBS = ("numpy", "augment", "mixed", "adamw", "loggers", "pydataset",
        "reshuffle", "repeat", "gan", "generator", "subclassed", "no_input",
        "gan_lazy")
BATCH = 8
BATCHES = 6  # per epoch
EPOCHS = 3


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=JOBS, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--save-freq", type=int, default=2)
    return p.parse_args()


class BatchCounter:
    """A user object in `state=`: counts the batches a callback reports."""

    def __init__(self):
        self.seen = []

    def get_state(self):
        return {"seen": list(self.seen)}

    def set_state(self, state):
        self.seen = [list(x) for x in state["seen"]]


class CountBatches(keras.callbacks.Callback):
    """A plain user callback (not in `state=`) that advances the counter."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.counter.seen.append([self.epoch, int(batch)])


class Killer(keras.callbacks.Callback):
    def __init__(self, ckpt, kill_at):
        super().__init__()
        self.ckpt, self.kill_at = ckpt, kill_at

    def on_train_batch_end(self, batch, logs=None):
        if (self.kill_at is not None and self.ckpt._step >= self.kill_at
                and self.ckpt.last_saved is not None):
            os.kill(os.getpid(), signal.SIGKILL)


def data(n=BATCH * BATCHES, shape=(8,)):
    rng = np.random.RandomState(0)
    x = rng.rand(n, *shape).astype("float32")
    y = (x.reshape(n, -1).sum(axis=1, keepdims=True) > np.prod(shape) / 2)
    return x, y.astype("float32")


def dense_model(optimizer=None, dropout=True):
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        *([keras.layers.Dropout(0.3)] if dropout else []),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01),
                  loss="binary_crossentropy", metrics=["accuracy"])
    return model


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, i):
        s = slice(i * BATCH, (i + 1) * BATCH)
        return self.x[s], self.y[s]


class GAN(keras.Model):
    """Keras' DCGAN pattern, tiny: two sub-models, two optimizers, a
    SeedGenerator, a custom `train_step`."""

    def __init__(self, latent=4):
        super().__init__()
        self.latent = latent
        self.discriminator = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
             keras.layers.Dense(1)])
        self.generator = keras.Sequential(
            [keras.Input((latent,)), keras.layers.Dense(8)])
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(self, real):
        if isinstance(real, tuple):
            real = real[0]
        n = tf.shape(real)[0]
        z = keras.random.normal((n, self.latent), seed=self.seed_generator)
        fake = self.generator(z)
        both = tf.concat([fake, real], axis=0)
        labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(both))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights))
        z = keras.random.normal((n, self.latent), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((n, 1)),
                                  self.discriminator(self.generator(z)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(
            zip(grads, self.generator.trainable_weights))
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


class Subclassed(keras.Model):
    """A subclassed model never built before `fit`: its variables are
    created when `fit` first traces its train step."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.dropout = keras.layers.Dropout(0.3)
        self.head = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x, training=False):
        return self.head(self.dropout(self.hidden(x), training=training))


def build_job(job, workdir):
    """(model, fit kwargs, extra callbacks, state, records()) for `job`."""
    x, y = data()
    callbacks, state, records = [], {}, {}
    fit = dict(epochs=EPOCHS)
    if job == "numpy":
        model = dense_model()
        fit.update(x=x, y=y, batch_size=BATCH, shuffle=True)
    elif job == "augment":
        xi, yi = data(shape=(8, 8, 1))
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.1),
            keras.layers.RandomZoom(0.1),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss="binary_crossentropy", metrics=["accuracy"])
        fit.update(x=xi, y=yi, batch_size=BATCH, shuffle=True)
    elif job == "mixed":
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = dense_model()
        fit.update(x=x, y=y, batch_size=BATCH, shuffle=True)
    elif job == "adamw":
        model = dense_model(keras.optimizers.AdamW(
            0.01, use_ema=True, ema_overwrite_frequency=3,
            gradient_accumulation_steps=2))
        fit.update(x=x, y=y, batch_size=BATCH, shuffle=True)
    elif job == "loggers":
        model = dense_model()
        counter = BatchCounter()
        state["counter"] = counter
        logdir = os.path.join(workdir, "tb")
        csv_path = os.path.join(workdir, "log.csv")
        callbacks += [CountBatches(counter),
                      keras.callbacks.TensorBoard(logdir, update_freq="batch"),
                      keras.callbacks.CSVLogger(csv_path)]
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        fit.update(x=ds, validation_data=ds.take(2))
        records.update(
            counter=lambda: counter.seen,
            csv=lambda: open(csv_path).read(),
            tensorboard=lambda: tensorboard_scalars(logdir))
    elif job == "pydataset":
        model = dense_model()
        fit.update(x=Batches(x, y))  # fit's default shuffle=True
    elif job == "reshuffle":
        model = dense_model()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            len(x), seed=7).map(lambda a, b: (a * 2.0, b)).batch(BATCH)
        fit.update(x=ds)
    elif job == "repeat":
        model = dense_model()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            len(x), seed=7).repeat().batch(BATCH)
        fit.update(x=ds, steps_per_epoch=BATCHES - 2)  # not whole passes
    elif job in ("gan", "gan_lazy"):
        model = GAN()
        d_opt, g_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(2e-3)
        if job == "gan":  # "gan_lazy": built by their first apply_gradients
            d_opt.build(model.discriminator.trainable_variables)
            g_opt.build(model.generator.trainable_variables)
        model.compile(d_opt, g_opt)
        ds = tf.data.Dataset.from_tensor_slices(x).shuffle(
            len(x), seed=3).batch(BATCH)
        fit.update(x=ds)
    elif job == "generator":
        model = dense_model()

        def batches():
            rng = np.random.RandomState(5)
            while True:
                i = rng.randint(0, len(x) - BATCH)
                yield x[i:i + BATCH], y[i:i + BATCH]

        fit.update(x=batches(), steps_per_epoch=BATCHES)
    elif job in ("subclassed", "no_input"):
        # Unbuilt at fit(): no Input, no build(), no call on data.
        model = Subclassed() if job == "subclassed" else keras.Sequential([
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss="binary_crossentropy", metrics=["accuracy"])
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            len(x), seed=7).batch(BATCH)
        fit.update(x=ds) if job == "subclassed" else fit.update(
            x=x, y=y, batch_size=BATCH, shuffle=True)
    return model, fit, callbacks, state, records


def tensorboard_scalars(logdir):
    """{run/tag: {step: value}}; a step logged twice must log the same."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "*", "events.*"))):
        run = os.path.basename(os.path.dirname(path))
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # the model's graph and config
                if value.tag.startswith("keras_ckpt/"):
                    continue  # keras_ckpt's own save cost, timed per run
                v = float(tf.make_ndarray(value.tensor))
                key = f"{run}/{value.tag}"
                seen = scalars.setdefault(key, {})
                step = str(event.step)
                if step in seen and seen[step] != v:
                    raise AssertionError(
                        f"{key} step {step} logged {seen[step]} then {v}")
                seen[step] = v
    return scalars


def all_variables(model):
    optimizers = [model.optimizer] + [
        v for k, v in sorted(vars(model).items())
        if isinstance(v, keras.optimizers.Optimizer) and v is not model.optimizer]
    variables = list(model.variables)
    for optimizer in optimizers:
        if optimizer is not None and optimizer.built:
            variables += list(optimizer.variables)
    return variables


def main():
    args = parse_args()
    keras.utils.set_random_seed(1234)
    model, fit, callbacks, state, records = build_job(args.job, args.dir)
    ckpt = keras_ckpt.Checkpoint(
        directory=os.path.join(args.dir, "ckpt"), save_freq=args.save_freq,
        max_to_keep=2, state=state, verbose=1)
    history = model.fit(
        callbacks=[ckpt, *callbacks, Killer(ckpt, args.kill_at_step)],
        verbose=0, **fit)
    np.savez(args.out, **{f"v{i}": np.asarray(v)
                          for i, v in enumerate(all_variables(model))})
    with open(args.out + ".json", "w") as f:
        json.dump({"history": history.history, "epochs": history.epoch,
                   **{name: get() for name, get in records.items()}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
