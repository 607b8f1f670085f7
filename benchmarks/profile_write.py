"""Where keras_ckpt's save time goes, phase by phase, with no training running.

    .venv/bin/python benchmarks/profile_write.py --size 1GB [--repeats 3]
    .venv/bin/python benchmarks/profile_write.py --size 1GB --during-training

Times, for the same model as `run.py`:
  snapshot       TrainingState.snapshot() on the training thread
  bundle_write   keras_ckpt's one-pass writer (bundle.py) of the snapshot
  tf_write       tf.train.Checkpoint(...).write() of the same tensors (the
                 writer keras_ckpt used before bundle.py; the same files)
  fsync          fsync of the data and index files and of the directory
  checksums      manifest_lib.describe_files() (re-reads the files to checksum
                 them; keras_ckpt overlaps it with the fsyncs)
  manifest       Manifest JSON: atomic write + fsync
  store.write    all of the above as LocalCheckpoints.write() runs them
  retain         LocalCheckpoints.retain() (pointer, deletions)
  raw            open/write/fsync of as many bytes (the disk's limit)
  crc32c_mem, sha256_mem
                 the checksum over the bytes already in memory (its CPU cost)
  next_step      with --during-training: the first train step after a
                 snapshot vs a normal step (the copy-on-write of the buffers
                 the snapshot holds happens there)

Phases are timed by re-running them by hand next to keras_ckpt's own write;
it uses private keras_ckpt internals and is a diagnostic, not an API.
"""

import argparse
import gc
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None):
    import run as bench
    import worker

    p = argparse.ArgumentParser()
    p.add_argument("--size", default="100MB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--during-training", action="store_true")
    p.add_argument("--tmp-dir", default=os.path.join(HERE, "results", "tmp"))
    args = p.parse_args(argv)
    _, spec = bench.parse_size(args.size)

    import numpy as np
    import tensorflow as tf

    from keras_ckpt import _keras_compat
    from keras_ckpt import manager as manager_lib
    from keras_ckpt import manifest as manifest_lib
    from keras_ckpt.engine import state as state_lib

    model, data = worker.build(spec["width"], spec["layers"], args.batch)
    os.makedirs(args.tmp_dir, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="profile-", dir=args.tmp_dir)
    times = {}

    def t(name, fn):
        start = time.perf_counter()
        value = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return value

    try:
        store = manager_lib.LocalCheckpoints(directory)
        ts = state_lib.TrainingState(model)
        for i in range(args.repeats):
            gc.collect()
            snap = t("snapshot", ts.snapshot)
            nbytes = snap.nbytes
            # keras_ckpt's own write, end to end.
            t("store.write", lambda: store.write(snap, step=2 * i + 1,
                                                 epoch=0, batch=0))
            t("retain", lambda: store.retain(manager_lib.RetentionPolicy(
                max_to_keep=2)))
            # The same phases, one at a time (store.write consumed `snap`).
            prefix = os.path.join(directory, f"manual-{i}")
            files = [os.path.basename(prefix) + s for s in
                     (manager_lib.DATA_SUFFIX, manager_lib.INDEX_SUFFIX)]

            def fsync_all():
                for f in files:
                    manager_lib._fsync_file(os.path.join(directory, f))
                manifest_lib.fsync_dir(directory)

            snap = ts.snapshot()
            t("bundle_write", lambda: store._write_files(
                snap, os.path.basename(prefix), None, None))
            t("fsync_after_bundle", fsync_all)
            for f in files:
                os.remove(os.path.join(directory, f))
            snap = ts.snapshot()
            trackables = {
                manager_lib._attr(g): _keras_compat.tensor_list(ts_)
                for g, ts_ in snap.tensors.items()}
            t("tf_write", lambda: tf.train.Checkpoint(**trackables).write(
                prefix))
            del trackables
            t("fsync", fsync_all)
            t("checksums", lambda: manifest_lib.describe_files(directory,
                                                               files))
            t("manifest", lambda: manifest_lib.atomic_write(
                os.path.join(directory, f"manual-{i}.json"), "{}" * 2000))
            for f in os.listdir(directory):
                if f.startswith(f"manual-{i}"):
                    os.remove(os.path.join(directory, f))
            del snap
        arrays = [np.asarray(v.numpy()) for v in worker.state_variables(model)]
        for i in range(args.repeats):
            path = os.path.join(directory, f"raw-{i}")

            def raw():
                with open(path, "wb") as f:
                    for a in arrays:
                        f.write(memoryview(a).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
                manifest_lib.fsync_dir(directory)

            t("raw", raw)
            os.remove(path)

            def hash_mem(h, chunk=16 << 20):
                # In 16 MiB bytes chunks, as a file is read (google_crc32c
                # takes bytes, not memoryviews).
                for a in arrays:
                    view = memoryview(a).cast("B")
                    for i in range(0, len(view), chunk):
                        h.update(bytes(view[i:i + chunk]))

            try:
                import google_crc32c

                t("crc32c_mem", lambda: hash_mem(google_crc32c.Checksum()))
            except ImportError:
                pass
            t("sha256_mem", lambda: hash_mem(hashlib.sha256()))
        del arrays

        if args.during_training:
            clock = worker.Clock()
            n = 6
            steps = n * (args.repeats + 1)
            held = []

            import keras

            class Snap(keras.callbacks.Callback):
                def on_train_batch_begin(self, batch, logs=None):
                    if batch % n == n - 1:
                        held[:] = [ts.snapshot()]  # drop the previous one

            model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0,
                      callbacks=[clock.First(), Snap(), clock.Last(steps)])
            step = [e - b for b, e in zip(clock.begin, clock.end)]
            after = [step[i] for i in range(n - 1, steps, n)]
            normal = [s for i, s in enumerate(step[1:], 1)
                      if i % n not in (n - 1, 0)]
            times["step_normal"] = normal
            times["step_after_snapshot"] = after
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(f"\n{args.size}: state {nbytes / 1e6:.0f} MB, median of "
          f"{args.repeats} (min..max)")
    for name, xs in times.items():
        med = statistics.median(xs)
        rate = ("" if name.startswith(("snapshot", "step", "retain",
                                       "manifest"))
                else f"  {nbytes / med / 1e6:7.0f} MB/s")
        print(f"  {name:20s} {med:8.3f} s  ({min(xs):.3f}..{max(xs):.3f})"
              f"{rate}")


if __name__ == "__main__":
    main()
