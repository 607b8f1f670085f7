"""Resume time vs the batch resumed at: is seeking the input O(1)?

For a tiny model trained on a tf.data pipeline (`range -> map -> batch`) of
`--batches` batches per epoch, measures in fresh processes the time from the
`fit()` call to the end of the first trained batch:

- `fresh`: no checkpoint, the epoch starts at batch 0;
- `resume@N` for each N of `--at`: a checkpoint at epoch 0, batch N.
  keras_ckpt restores the saved tf.data iterator state (no batch is read
  again);
- `replay@N` (with `--replay`): the same checkpoint without the iterator
  state, so the N batches are pulled again, as for inputs whose iterator
  tf.data cannot save (generators, `py_function`).

    python benchmarks/resume.py                       # 20,000 batches, N = 100, 19,000
    python benchmarks/resume.py --batches 2000 --at 100,1900 --replay
    python benchmarks/resume.py --map-cost 200        # a costlier map (more work per batch)

Prints a table (the fastest of `--repeats` runs, in seconds, and the
checkpoint's data-position bytes) and, with
`--json PATH`, writes it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20000)
    p.add_argument("--at", default="100,19000",
                   help="comma-separated batches to resume at")
    p.add_argument("--replay", action="store_true",
                   help="also measure the resume without iterator state")
    p.add_argument("--map-cost", type=int, default=20,
                   help="matmuls per element in the map (input cost)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per row; the fastest is reported")
    p.add_argument("--json")
    p.add_argument("--child", choices=["prepare", "measure"],
                   help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-iterator-state", action="store_true",
                   help=argparse.SUPPRESS)
    return p.parse_args()


def child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import keras_ckpt
    from keras_ckpt import _keras_compat

    if args.no_iterator_state:
        _keras_compat.save_iterator = lambda iterator: None
    keras.utils.set_random_seed(0)
    cost = args.map_cost

    def work(i):
        x = tf.fill([16, 16], tf.cast(i % 7, tf.float32) / 7.0)
        for _ in range(cost):
            x = tf.matmul(x, x) / 16.0
        return tf.reshape(x[:1, :8], [8]), tf.cast(i % 2, tf.float32)

    ds = tf.data.Dataset.range(args.batches * 4).map(work).batch(4)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    # "prepare" commits a checkpoint at batch `stop_at` (before that batch
    # trains) and exits there, as a preempted job would.
    ckpt = keras_ckpt.Checkpoint(
        directory=args.dir,
        save_freq=args.stop_at if args.child == "prepare" else "epoch",
        async_save=False, on_preemption=None, verbose=0)

    class Probe(keras.callbacks.Callback):
        first = None

        def on_train_batch_begin(self, batch, logs=None):
            if args.child == "prepare" and batch >= args.stop_at:
                os._exit(0)

        def on_train_batch_end(self, batch, logs=None):
            if Probe.first is None:
                Probe.first = time.perf_counter()
            if args.child == "measure":
                self.model.stop_training = True

    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0, callbacks=[ckpt, Probe()])
    print(json.dumps({"seconds": Probe.first - start}))


def run_child(args, mode, directory, stop_at=0, no_state=False):
    command = [sys.executable, __file__, "--child", mode, "--dir", directory,
               "--batches", str(args.batches), "--map-cost", str(args.map_cost),
               "--stop-at", str(stop_at)]
    if no_state:
        command.append("--no-iterator-state")
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    if mode == "prepare":
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def data_position_bytes(directory):
    with open(os.path.join(directory, "checkpoint")) as f:
        name = f.readline().split('"')[1]
    with open(os.path.join(directory, f"{name}.json")) as f:
        manifest = json.load(f)
    specs = manifest["variables"].get("adapter/data-position", [])
    return sum(int(np.prod(s[1])) * np.dtype(s[2]).itemsize for s in specs)


def main():
    args = parse_args()
    if args.child:
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        rows.append(("fresh", min(
            run_child(args, "measure", f"{root}/fresh-{i}")
            for i in range(args.repeats)), 0))
        for n in [int(v) for v in args.at.split(",")]:
            for replay in ([False, True] if args.replay else [False]):
                times = []
                for i in range(args.repeats):
                    directory = f"{root}/{n}-{replay}-{i}"
                    run_child(args, "prepare", directory, stop_at=n,
                              no_state=replay)
                    size = data_position_bytes(directory)
                    times.append(run_child(args, "measure", directory))
                rows.append((f"{'replay' if replay else 'resume'}@{n}",
                             min(times), size))
    print(f"{'run':<14} {'first batch (s)':>16} {'data position (B)':>18}")
    for name, seconds, size in rows:
        print(f"{name:<14} {seconds:>16.2f} {size:>18}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(run=r, seconds=s, data_bytes=b)
                       for r, s, b in rows], f, indent=1)


if __name__ == "__main__":
    main()
