"""Mirroring cost, side by side for S3, GCS and Azure Blob: keras_ckpt's
`Uploader` vs each cloud SDK's own single-call transfer, and the training
stall that mirroring adds to a save.

    .venv/bin/python benchmarks/mirror.py               # ~1 GB checkpoint, ~6 min on 2 cores
    .venv/bin/python benchmarks/mirror.py --quick       # 128 MB, 1 repeat, under ~1.5 min
    .venv/bin/python benchmarks/mirror.py --size-mb 256 --clouds s3,az --repeats 2

Everything runs against loopback emulators this script starts itself (moto's
server in a child process, fake-gcs-server, Azurite; see `tests/emulators.py`),
so the numbers measure the client side (keras_ckpt and the SDKs) and the
emulators, not a cloud's network. Three parts:

1. upload: `Uploader.mirror(local_dir, name, [name])` of a real keras_ckpt
   checkpoint (data + index + manifest, then the pointer, then retention) vs
   uploading the same three files with the SDK's own call, once with the
   SDK's default settings and once with the uploader's settings ("tuned");
2. download: `Uploader.download_checkpoint()` (verified, as a resume does) vs
   the SDK's download of the same files;
3. stall: `fit` of a ~100 MB-state model with `keras_ckpt.Checkpoint(
   save_freq=N, mirror=<url>)` vs the same without `mirror` (and vs no
   checkpointing at all): the time mirroring adds to each save.

Prints tables and writes `benchmarks/results/mirror-<time>.{json,md}` and
`mirror-latest.{json,md}`. Readings: `docs/performance-mirror.md`.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import emulators  # noqa: E402  (tests/emulators.py)
from run import _cmd  # noqa: E402  (benchmarks/run.py)
from worker import build as build_model  # noqa: E402  (benchmarks/worker.py)

MiB = 2**20
CLOUDS = ("s3", "gs", "az")
CLOUD_LABEL = {"s3": "S3 (moto)", "gs": "GCS (fake-gcs-server)",
               "az": "Azure (Azurite)"}
# What "sdk" means per cloud and direction: the SDK's own single call per
# file. "default": the SDK's defaults (Azure: max_concurrency=8, since its
# default of 1 is nobody's best); "tuned": the same call with the settings
# keras_ckpt's uploader uses (UploaderOptions: 32 MiB threshold, 16 MiB
# parts, 8 in parallel), so kc vs tuned isolates keras_ckpt's own overhead.
SDK_CALLS = {
    ("s3", "up"): "s3.upload_file(path, bucket, key, Config=TransferConfig(...))",
    ("s3", "down"): "s3.download_file(bucket, key, path, Config=TransferConfig(...))",
    ("gs", "up"): "blob.upload_from_filename(path) (resumable; default chunk "
                  "100 MiB, tuned 16 MiB)",
    ("gs", "down"): "blob.download_to_filename(path)",
    ("az", "up"): "container.upload_blob(key, f, max_concurrency=8)",
    ("az", "down"): "container.download_blob(key, max_concurrency=8)"
                    ".readinto(f)",
}
VARIANTS = {  # which SDK variants exist per (cloud, direction)
    ("s3", "up"): ("default", "tuned"), ("s3", "down"): ("default", "tuned"),
    ("gs", "up"): ("default", "tuned"), ("gs", "down"): ("default",),
    ("az", "up"): ("default", "tuned"), ("az", "down"): ("default", "tuned"),
}
TARGET_RATIO = 0.9


# ---------------------------------------------------------------------------
# Machine and load (as run.py records them)
# ---------------------------------------------------------------------------


def machine_info(path):
    info = {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            models = [l.split(":", 1)[1].strip() for l in f
                      if l.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    df = _cmd(["df", "-T", path]).splitlines()
    if len(df) == 2:
        dev, fstype = df[1].split()[:2]
        info["disk"] = {"device": dev, "fs": fstype}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def versions():
    from importlib import metadata

    out = {}
    for dist in ("boto3", "s3transfer", "google-cloud-storage",
                 "google-resumable-media", "azure-storage-blob", "moto",
                 "keras", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        package = os.path.join(
            os.path.dirname(os.path.realpath(emulators.azurite_binary())),
            "..", "..", "..", "package.json")
        with open(package) as f:
            out["azurite"] = json.load(f)["version"]
    except (OSError, ValueError, KeyError, emulators.EmulatorError):
        pass
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s():
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:3]) + sum(fields[5:8])) / _TICK


def _proc_cpu_s(pid):
    """utime + stime of a process (its threads included), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """CPU used during a `with` block: by this process, by the emulators,
    and by everything else on the machine ("other load")."""

    def __init__(self, emulator_pids):
        self.pids = dict(emulator_pids)  # name -> pid

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.busy0 = _busy_cpu_s()
        self.me0 = _proc_cpu_s(os.getpid())
        self.em0 = {k: _proc_cpu_s(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy1 = _busy_cpu_s()
        self.client_cpu = _proc_cpu_s(os.getpid()) - self.me0
        self.emulator_cpu = {k: _proc_cpu_s(p) - self.em0[k]
                             for k, p in self.pids.items()}
        self.other = None
        if self.busy0 is not None and busy1 is not None and self.wall > 0:
            ours = self.client_cpu + sum(self.emulator_cpu.values())
            self.other = max(0.0, (busy1 - self.busy0) - ours) / (
                self.wall * (os.cpu_count() or 1))
        return False

    def record(self):
        return {"wall_s": self.wall, "client_cpu_s": self.client_cpu,
                "emulator_cpu_s": self.emulator_cpu,
                "other_cpu_share": self.other}


# ---------------------------------------------------------------------------
# Emulators
# ---------------------------------------------------------------------------
class Emulators:
    """The three emulators, their SDK environment set in os.environ, one
    bucket (container) each."""

    def __init__(self, clouds, workdir):
        self.running = {}
        self.buckets = {}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                     "GOOGLE_APPLICATION_CREDENTIALS",
                     "AZURE_STORAGE_ACCOUNT_URL", "KERAS_CKPT_MIRROR"):
            os.environ.pop(name, None)
        os.environ["NO_PROXY"] = ",".join(
            p for p in ("127.0.0.1,localhost", os.environ.get("NO_PROXY"))
            if p)
        os.environ["no_proxy"] = os.environ["NO_PROXY"]
        try:
            for cloud in clouds:
                if cloud == "s3":
                    # Out of process: in this process moto would share the
                    # GIL with the client under test.
                    em = emulators.start_moto(in_process=False)
                elif cloud == "gs":
                    em = emulators.start_fake_gcs()
                else:
                    os.makedirs(os.path.join(workdir, "azurite"),
                                exist_ok=True)
                    em = emulators.start_azurite(
                        os.path.join(workdir, "azurite"))
                self.running[cloud] = em
                os.environ.update(em.env())
                bucket = f"kc-bench-{uuid.uuid4().hex[:8]}"
                em.create_bucket(bucket)
                self.buckets[cloud] = bucket
        except BaseException:
            self.stop()
            raise

    def pids(self):
        return {c: e.pid for c, e in self.running.items() if e.pid}

    def stop(self):
        for em in self.running.values():
            em.stop()


# ---------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------
def make_checkpoint(directory, size_bytes):
    """A real keras_ckpt checkpoint of ~size_bytes of random float32
    tensors (64 MiB each), written by `LocalCheckpoints.write`."""
    import numpy as np
    import tensorflow as tf

    from keras_ckpt import manager, state

    per = 64 * MiB // 4
    count = max(1, round(size_bytes / (per * 4)))
    if count == 1:
        per = max(1, size_bytes // 4)
    rng = np.random.default_rng(0)
    tensors = [tf.constant(rng.random(per, dtype=np.float32))
               for _ in range(count)]
    snap = state.Snapshot(
        tensors={"model": tensors},
        specs={"model": [[f"model/w{i}", [per], "float32"]
                         for i in range(count)]},
        values={},
    )
    store = manager.LocalCheckpoints(directory)
    t0 = time.perf_counter()
    manifest = store.write(snap, step=1, epoch=0, batch=1)
    store.write_pointer([manifest])
    write_s = time.perf_counter() - t0
    del tensors, snap
    files = sorted(manifest.files) + [f"{manifest.name}.json"]
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in files}
    return manifest.name, files, sizes, write_s


# ---------------------------------------------------------------------------
# SDK transfers (clients made before timing)
# ---------------------------------------------------------------------------
class SDK:
    """One cloud's SDK, with a `default` and a `tuned` client."""

    def __init__(self, cloud, bucket, options):
        self.cloud, self.bucket, self.o = cloud, bucket, options
        if cloud == "s3":
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config

            self.client = {
                "default": boto3.session.Session().client("s3"),
                "tuned": boto3.session.Session().client("s3", config=Config(
                    max_pool_connections=max(10, 2 * options.max_concurrency))),
            }
            self.config = {
                "default": TransferConfig(),
                "tuned": TransferConfig(
                    multipart_threshold=options.multipart_threshold,
                    multipart_chunksize=options.chunk_size,
                    max_concurrency=options.max_concurrency),
            }
        elif cloud == "gs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            client = storage.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"],
                                    credentials=AnonymousCredentials())
            self.gbucket = client.bucket(bucket)
        else:
            from azure.storage.blob import BlobServiceClient

            conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
            self.container = {
                "default": BlobServiceClient.from_connection_string(
                    conn).get_container_client(bucket),
                "tuned": BlobServiceClient.from_connection_string(
                    conn, max_single_put_size=options.multipart_threshold,
                    max_block_size=options.chunk_size,
                    max_single_get_size=options.multipart_threshold,
                    max_chunk_get_size=options.chunk_size,
                ).get_container_client(bucket),
            }

    def upload(self, variant, path, key):
        if self.cloud == "s3":
            self.client[variant].upload_file(path, self.bucket, key,
                                             Config=self.config[variant])
        elif self.cloud == "gs":
            size = os.path.getsize(path)
            chunk = (self.o.chunk_size if variant == "tuned"
                     and size >= self.o.multipart_threshold else None)
            self.gbucket.blob(key, chunk_size=chunk).upload_from_filename(path)
        else:
            with open(path, "rb") as f:
                self.container[variant].upload_blob(
                    key, f, length=os.path.getsize(path), overwrite=True,
                    max_concurrency=self.o.max_concurrency)

    def download(self, variant, key, path):
        if self.cloud == "s3":
            self.client[variant].download_file(self.bucket, key, path,
                                               Config=self.config[variant])
        elif self.cloud == "gs":
            self.gbucket.blob(key).download_to_filename(path)
        else:
            with open(path, "wb") as f:
                self.container[variant].download_blob(
                    key, max_concurrency=self.o.max_concurrency).readinto(f)

    def delete_prefix(self, prefix):
        prefix = prefix.rstrip("/") + "/"
        if self.cloud == "s3":
            c = self.client["default"]
            for page in c.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if keys:
                    c.delete_objects(Bucket=self.bucket,
                                     Delete={"Objects": keys})
        elif self.cloud == "gs":
            for blob in list(self.gbucket.client.list_blobs(
                    self.bucket, prefix=prefix)):
                blob.delete()
        else:
            c = self.container["default"]
            for blob in list(c.list_blobs(name_starts_with=prefix)):
                c.delete_blob(blob.name)


# ---------------------------------------------------------------------------
# Part 1 + 2: transfers
# ---------------------------------------------------------------------------
def _settle():
    """Flush dirty pages outside the timed regions."""
    try:
        os.sync()
    except AttributeError:
        pass


def variants(args, cloud, direction):
    return [v for v in VARIANTS[cloud, direction] if v in args.variants]


def run_transfers(args, ems, tmp):
    from keras_ckpt.store import base as uploader_base
    from keras_ckpt.store.base import UploaderOptions

    options = UploaderOptions()
    local = os.path.join(tmp, "local")
    t0 = time.perf_counter()
    name, files, sizes, write_s = make_checkpoint(local, args.size_mb * MiB)
    total = sum(sizes.values())
    print(f"checkpoint {name}: {total / 1e6:.0f} MB in {len(files)} files "
          f"({', '.join(f'{f} {s / 1e6:.1f} MB' for f, s in sizes.items())});"
          f" LocalCheckpoints.write {write_s:.1f} s "
          f"({time.perf_counter() - t0:.1f} s with generating it)", flush=True)
    _settle()
    meter = lambda: CpuMeter(ems.pids())  # noqa: E731
    samples = []  # dicts: cloud, direction, who, variant, repeat, ...

    split = {}  # filled by the wrappers below during a keras_ckpt transfer

    def timed(cloud, direction, who, variant, repeat, fn):
        _settle()
        split.clear()
        with meter() as m:
            fn()
        rec = dict(cloud=cloud, direction=direction, who=who,
                   variant=variant, repeat=repeat, bytes=total,
                   mbps=total / m.wall / 1e6, **m.record())
        if who == "kc":
            # Where keras_ckpt's time went: inside the SDK's transfer calls
            # (`_upload_file`/`_download_file`), verifying checksums, and
            # everything else (listing, size checks, manifest, pointer,
            # retention, renames, fsync).
            rec["kc_sdk_call_s"] = split.get("sdk", 0.0)
            rec["kc_verify_s"] = split.get("verify", 0.0)
            rec["kc_other_s"] = m.wall - rec["kc_sdk_call_s"] - rec[
                "kc_verify_s"]
        samples.append(rec)
        print(f"  {cloud} {direction:4} {who:3} {variant:8} "
              f"{m.wall:6.2f} s {rec['mbps']:7.1f} MB/s"
              + (f"  (SDK calls {rec['kc_sdk_call_s']:.2f} s, verify "
                 f"{rec['kc_verify_s']:.2f} s, rest {rec['kc_other_s']:.2f} s)"
                 if who == "kc" else "")
              + (f"  (other load {m.other:.0%})" if m.other is not None
                 else ""), flush=True)

    def add_time(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                split[key] = split.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    # Checksum verification of downloads (a module-level helper of
    # uploaders/base.py; wrapped here, in this process only).
    file_problem = uploader_base._file_problem
    uploader_base._file_problem = add_time("verify", file_problem)
    try:
        _transfer_clouds(args, ems, tmp, local, name, files, total, options,
                         timed, add_time)
    finally:
        uploader_base._file_problem = file_problem
    shutil.rmtree(local, ignore_errors=True)
    return {"checkpoint": {"name": name, "files": sizes, "bytes": total,
                           "local_write_s": write_s},
            "options": {k: getattr(options, k) for k in (
                "max_concurrency", "multipart_threshold", "chunk_size")},
            "variants": args.variants, "samples": samples}


def _transfer_clouds(args, ems, tmp, local, name, files, total, options,
                     timed, add_time):
    import keras_ckpt

    for cloud in args.clouds:
        bucket = ems.buckets[cloud]
        sdk = SDK(cloud, bucket, options)
        for r in range(args.repeats):
            run = uuid.uuid4().hex[:8]
            kc_prefix = f"kc-{run}"
            uploader = keras_ckpt.get_uploader(f"{cloud}://{bucket}/{kc_prefix}")
            uploader.check()  # creates the client and connects, untimed
            uploader._upload_file = add_time("sdk", uploader._upload_file)
            uploader._download_file = add_time("sdk", uploader._download_file)
            ups = [("kc", "mirror")] + [("sdk", v)
                                        for v in variants(args, cloud, "up")]
            if r % 2:
                ups.reverse()
            for who, variant in ups:
                if who == "kc":
                    timed(cloud, "up", who, variant, r,
                          lambda: uploader.mirror(local, name, [name]))
                else:
                    prefix = f"sdk-{variant}-{run}"
                    timed(cloud, "up", who, variant, r,
                          lambda: [sdk.upload(variant, os.path.join(local, f),
                                              f"{prefix}/{f}")
                                   for f in files])
                    sdk.delete_prefix(prefix)
            # Downloads all read the checkpoint keras_ckpt mirrored.
            downs = [("kc", "verified")] + [
                ("sdk", v) for v in variants(args, cloud, "down")]
            if r % 2:
                downs.reverse()
            for who, variant in downs:
                dest = os.path.join(tmp, f"down-{who}-{variant}")
                os.makedirs(dest, exist_ok=True)
                if who == "kc":
                    timed(cloud, "down", who, variant, r,
                          lambda: uploader.download_checkpoint(name, dest))
                else:
                    timed(cloud, "down", who, variant, r,
                          lambda: [sdk.download(variant, f"{kc_prefix}/{f}",
                                                os.path.join(dest, f))
                                   for f in files])
                shutil.rmtree(dest, ignore_errors=True)
            sdk.delete_prefix(kc_prefix)


def summarize_transfers(result, clouds):
    rows = []
    samples = result["samples"]
    for cloud in clouds:
        for direction in ("up", "down"):
            mine = [s for s in samples
                    if s["cloud"] == cloud and s["direction"] == direction]
            if not mine:
                continue
            best = lambda who, var=None: max(  # noqa: E731
                (s["mbps"] for s in mine if s["who"] == who
                 and (var is None or s["variant"] == var)), default=None)
            kc = best("kc")
            sdk = {v: best("sdk", v) for v in VARIANTS[cloud, direction]
                   if best("sdk", v) is not None}
            sdk_best_v = max(sdk, key=lambda v: sdk[v] or 0)
            sdk_best = sdk[sdk_best_v]
            other = [s["other_cpu_share"] for s in mine
                     if s["other_cpu_share"] is not None]
            kc_s = [s for s in mine if s["who"] == "kc"]
            sdk_s = [s for s in mine if s["who"] == "sdk"
                     and s["variant"] == sdk_best_v]

            def per_gb(ss, key):
                vals = [(s[key] if key == "client_cpu_s"
                         else s["emulator_cpu_s"].get(cloud, 0.0))
                        / (s["bytes"] / 1e9) for s in ss]
                return statistics.median(vals) if vals else None

            fastest_kc = max(kc_s, key=lambda s: s["mbps"])
            rows.append({
                "cloud": cloud, "direction": direction, "kc_mbps": kc,
                "kc_s": fastest_kc["wall_s"],
                "kc_sdk_call_s": fastest_kc.get("kc_sdk_call_s"),
                "kc_verify_s": fastest_kc.get("kc_verify_s"),
                "kc_other_s": fastest_kc.get("kc_other_s"),
                "sdk_s": min(s["wall_s"] for s in sdk_s) if sdk_s else None,
                "sdk_mbps": sdk, "sdk_best_variant": sdk_best_v,
                "ratio": kc / sdk_best if kc and sdk_best else None,
                "ratio_vs": {v: kc / m for v, m in sdk.items() if kc and m},
                "kc_client_cpu_s_per_gb": per_gb(kc_s, "client_cpu_s"),
                "sdk_client_cpu_s_per_gb": per_gb(sdk_s, "client_cpu_s"),
                "kc_emulator_cpu_s_per_gb": per_gb(kc_s, "emulator"),
                "sdk_emulator_cpu_s_per_gb": per_gb(sdk_s, "emulator"),
                "other_load_max": max(other) if other else None,
                "repeats": len(kc_s),
            })
    return rows


# ---------------------------------------------------------------------------
# Part 3: training stall
# ---------------------------------------------------------------------------


def _clock():
    import keras

    clock = {"begin": [], "end": []}

    class First(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            clock["begin"].append(time.perf_counter())

    class Last(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            clock["end"].append(time.perf_counter())

    return clock, First(), Last()


def _wrap(obj, name, record, key):
    original = getattr(obj, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            record.setdefault(key, []).append((t0, time.perf_counter() - t0))

    setattr(obj, name, timed)


def one_fit(model, data, config, steps, save_freq, ems, tmp, sdks):
    """One timed fit; config: "none", "local" or a cloud."""
    import keras_ckpt

    clock, first, last = _clock()
    record = {}
    callbacks = []
    directory = os.path.join(tmp, f"fit-{uuid.uuid4().hex[:8]}")
    prefix = None
    if config != "none":
        mirror = None
        if config in CLOUDS:
            prefix = f"stall-{uuid.uuid4().hex[:8]}"
            mirror = keras_ckpt.get_uploader(
                f"{config}://{ems.buckets[config]}/{prefix}")
            _wrap(mirror, "mirror", record, "mirror")
        cb = keras_ckpt.Checkpoint(
            directory=directory, mirror=mirror, save_freq=save_freq,
            on_preemption=None, verbose=0, resume=False, max_to_keep=2)
        _wrap(cb._store, "write", record, "write")
        _wrap(cb._writer, "wait_until_finished", record, "wait")
        # The training thread's own time in the callback (snapshot, submit,
        # any wait for the previous save): the synchronous part of a save.
        _wrap(cb, "on_train_batch_begin", record, "hook")
        _wrap(cb, "on_train_batch_end", record, "hook")
        callbacks = [cb]
    _settle()
    with CpuMeter(ems.pids()) as m:
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[first] + callbacks + [last])
        t_end = time.perf_counter()
    begin, end = clock["begin"], clock["end"]
    loop_end = end[-1]
    steps_s = [e - b for b, e in zip(begin, end)]
    out = {
        "config": config, "loop_s": loop_end - begin[0],
        "fit_s": m.wall, "end_of_fit_s": t_end - loop_end,
        "median_step_s": statistics.median(steps_s),
        "cpu": m.record(),
    }
    for key in ("write", "mirror", "wait", "hook"):
        calls = record.get(key, [])
        out[f"{key}_in_loop_s"] = [d for t0, d in calls if t0 < loop_end]
        out[f"{key}_at_end_s"] = [d for t0, d in calls if t0 >= loop_end]
    # One entry per batch hook: keep the sums only.
    if config != "none":
        out["hook_in_loop_s"] = [sum(out["hook_in_loop_s"])]
        out["hook_at_end_s"] = [sum(out["hook_at_end_s"])]
    shutil.rmtree(directory, ignore_errors=True)
    if prefix:
        sdks[config].delete_prefix(prefix)
    return out


def run_stall(args, ems, tmp):
    from keras_ckpt.store.base import UploaderOptions

    t0 = time.perf_counter()
    model, data = build_model(args.stall_width, args.stall_layers, args.batch)
    import numpy as np

    state = sum(int(np.prod(v.shape)) * 4 for v in
                {id(v): v for v in list(model.variables)
                 + list(model.optimizer.variables)}.values())
    # Step time, to place saves `--save-interval` seconds apart.
    clock, first, last = _clock()
    model.fit(data, epochs=1, steps_per_epoch=30, verbose=0,
              callbacks=[first, last])
    step = statistics.median(
        e - b for b, e in zip(clock["begin"][5:], clock["end"][5:]))
    save_freq = args.save_freq or max(5, round(args.save_interval / step))
    steps = args.saves * save_freq + save_freq // 2
    print(f"model: {state / 1e6:.0f} MB of state (weights + Adam), batch "
          f"{args.batch}, step {step * 1000:.1f} ms -> a save every "
          f"{save_freq} steps (~{save_freq * step:.1f} s), {args.saves} saves"
          f" in {steps} steps; setup {time.perf_counter() - t0:.0f} s",
          flush=True)
    options = UploaderOptions()
    sdks = {c: SDK(c, ems.buckets[c], options) for c in args.clouds}
    configs = ["none", "local"] + list(args.clouds)
    fits = []
    for r in range(args.stall_repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for config in order:
            res = one_fit(model, data, config, steps, save_freq, ems, tmp,
                          sdks)
            res["repeat"] = r
            fits.append(res)
            mirror = res.get("mirror_in_loop_s") or []
            print(f"  fit {config:5} loop {res['loop_s']:6.2f} s  end of fit "
                  f"{res['end_of_fit_s']:5.2f} s"
                  + (f"  mirror/save {statistics.median(mirror):.2f} s"
                     if mirror else "")
                  + (f"  waited {sum(res['wait_in_loop_s']):.2f} s"
                     if res.get("wait_in_loop_s") else "")
                  + (f"  (other load {res['cpu']['other_cpu_share']:.0%})"
                     if res['cpu']['other_cpu_share'] is not None else ""),
                  flush=True)
    return {"state_bytes": state, "step_s": step, "save_freq": save_freq,
            "save_interval_s": save_freq * step, "steps": steps,
            "saves": args.saves, "repeats": args.stall_repeats,
            "fits": fits}


def summarize_stall(result, clouds):
    fits, saves = result["fits"], result["saves"]
    best = {}
    for f in fits:
        if f["config"] not in best or f["loop_s"] < best[f["config"]]["loop_s"]:
            best[f["config"]] = f
    base, local = best.get("none"), best.get("local")
    local_hook = None
    if local is not None:
        local_hook = min(sum(x["hook_in_loop_s"]) / saves for x in fits
                         if x["config"] == "local")
    rows = []
    for config in ["none", "local"] + list(clouds):
        f = best.get(config)
        if f is None:
            continue
        mine = [x for x in fits if x["config"] == config]
        # Pair by repeat against local: the noise range of "added".
        pairs = []
        for x in mine:
            loc = [y for y in fits if y["config"] == "local"
                   and y["repeat"] == x["repeat"]]
            if loc and config in clouds:
                pairs.append((x["loop_s"] - loc[0]["loop_s"]) / saves)
        mirror = [d for x in mine for d in x.get("mirror_in_loop_s", [])]
        write = [d for x in mine for d in x.get("write_in_loop_s", [])]
        waits = [sum(x.get("wait_in_loop_s", [])) / saves for x in mine]
        hooks = [sum(x["hook_in_loop_s"]) / saves for x in mine
                 if x.get("hook_in_loop_s")]
        cpu = [x["cpu"]["client_cpu_s"] for x in mine]
        em_cpu = [sum(x["cpu"]["emulator_cpu_s"].values()) for x in mine]
        other = [x["cpu"]["other_cpu_share"] for x in mine
                 if x["cpu"]["other_cpu_share"] is not None]
        rows.append({
            "config": config,
            "loop_s": f["loop_s"],
            "stall_vs_none_s": (f["loop_s"] - base["loop_s"]) / saves
            if base and config != "none" else None,
            "added_vs_local_s": (f["loop_s"] - local["loop_s"]) / saves
            if local and config in clouds else None,
            "added_pairs_s": pairs,
            "median_step_x_none": (f["median_step_s"] / base["median_step_s"]
                                   if base else None),
            "local_write_s": statistics.median(write) if write else None,
            "mirror_s": statistics.median(mirror) if mirror else None,
            "wait_in_loop_per_save_s": min(waits) if waits else None,
            "hook_per_save_s": min(hooks) if hooks else None,
            "hook_added_vs_local_s": (min(hooks) - local_hook)
            if hooks and local_hook is not None and config in clouds
            else None,
            "end_of_fit_s": min(x["end_of_fit_s"] for x in mine),
            "emulator_cpu_s_per_fit": min(em_cpu) if em_cpu else None,
            "client_cpu_s_per_fit": min(cpu) if cpu else None,
            "client_cpu_added_per_save_s": (
                (min(cpu) - min(x["cpu"]["client_cpu_s"] for x in fits
                                if x["config"] == "local")) / (saves + 1)
                if cpu and local and config in clouds else None),
            "other_load_max": max(other) if other else None,
        })
    return rows


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def _f(v, fmt, missing="-"):
    return missing if v is None else format(v, fmt)


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def transfer_table(rows):
    tuned = any("tuned" in r["sdk_mbps"] for r in rows)
    head = (["cloud", "dir", "keras_ckpt MB/s", "SDK default MB/s"]
            + (["SDK tuned MB/s"] if tuned else [])
            + ["ratio (vs best SDK)", "target",
               "keras_ckpt s: SDK call + verify + rest",
               "client CPU s/GB kc / sdk", "emulator CPU s/GB kc / sdk",
               "other load"])
    body = []
    for r in rows:
        ratio = r["ratio"]
        verdict = ("-" if ratio is None else
                   "PASS" if ratio >= TARGET_RATIO else "MISS")
        body.append([
            CLOUD_LABEL[r["cloud"]],
            {"up": "upload (mirror)", "down": "download (resume)"}[
                r["direction"]],
            _f(r["kc_mbps"], ".0f"),
            _f(r["sdk_mbps"].get("default"), ".0f"),
        ] + ([_f(r["sdk_mbps"].get("tuned"), ".0f")] if tuned else []) + [
            _f(ratio, ".2f") + "x" + (f" ({r['sdk_best_variant']})"
                                      if tuned else ""),
            f">= {TARGET_RATIO}x {verdict}",
            f"{_f(r['kc_s'], '.1f')} = {_f(r['kc_sdk_call_s'], '.1f')} + "
            f"{_f(r['kc_verify_s'], '.1f')} + {_f(r['kc_other_s'], '.1f')}",
            f"{_f(r['kc_client_cpu_s_per_gb'], '.1f')} / "
            f"{_f(r['sdk_client_cpu_s_per_gb'], '.1f')}",
            f"{_f(r['kc_emulator_cpu_s_per_gb'], '.1f')} / "
            f"{_f(r['sdk_emulator_cpu_s_per_gb'], '.1f')}",
            _pct(r["other_load_max"]),
        ])
    return head, body


STALL_SLACK_S = 0.05  # "no added stall": within this, or 10% of the local hook


def stall_verdict(r, local_hook):
    added = r.get("hook_added_vs_local_s")
    if added is None:
        return "-"
    slack = max(STALL_SLACK_S, 0.1 * (local_hook or 0.0))
    return "PASS" if added <= slack else "MISS"


def stall_table(rows):
    head = ["config", "loop s", "stall s/save vs none",
            "added s/save vs local (loop) [pairs]", "in-hook s/save",
            "in-hook added vs local", "target", "waited s/save",
            "step ×none", "local write s", "mirror s/save", "end of fit s",
            "client CPU s/fit", "client CPU added s/save",
            "emulator CPU s/fit", "other load"]
    label = {"none": "fit, no checkpoints", "local": "Checkpoint, no mirror"}
    local_hook = next((r["hook_per_save_s"] for r in rows
                       if r["config"] == "local"), None)
    body = []
    for r in rows:
        pairs = r["added_pairs_s"]
        body.append([
            label.get(r["config"]) or
            f"Checkpoint + {CLOUD_LABEL[r['config']]}",
            _f(r["loop_s"], ".2f"),
            _f(r["stall_vs_none_s"], ".3f"),
            _f(r["added_vs_local_s"], ".3f") + (
                f" [{min(pairs):.2f}..{max(pairs):.2f}]" if len(pairs) > 1
                else ""),
            _f(r["hook_per_save_s"], ".3f"),
            _f(r["hook_added_vs_local_s"], "+.3f"),
            stall_verdict(r, local_hook),
            _f(r["wait_in_loop_per_save_s"], ".2f"),
            _f(r["median_step_x_none"], ".2f"),
            _f(r["local_write_s"], ".2f"),
            _f(r["mirror_s"], ".2f"),
            _f(r["end_of_fit_s"], ".2f"),
            _f(r["client_cpu_s_per_fit"], ".1f"),
            _f(r["client_cpu_added_per_save_s"], "+.2f"),
            _f(r["emulator_cpu_s_per_fit"], ".1f"),
            _pct(r["other_load_max"]),
        ])
    return head, body


def render_text(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 2 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])]
                     + [line(r) for r in body])


def render_md(head, body):
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(out)


# ---------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 MB checkpoint, 1 repeat, 1 fit per "
                        "config, shorter save interval (~1.5 min)")
    p.add_argument("--size-mb", type=int, default=None,
                   help="checkpoint size for parts 1-2, MiB (default 1024)")
    p.add_argument("--clouds", default=",".join(CLOUDS),
                   help="comma-separated subset of s3,gs,az")
    p.add_argument("--parts", default="transfer,stall",
                   help="comma-separated subset of transfer,stall")
    p.add_argument("--repeats", type=int, default=None,
                   help="transfer repeats, best taken (default 1)")
    p.add_argument("--variants", default="default",
                   help="SDK baselines to measure: default (the SDK's own "
                        "settings; Azure with max_concurrency=8) and/or tuned "
                        "(the uploader's part size and concurrency), e.g. "
                        "default,tuned (default: default)")
    p.add_argument("--stall-repeats", type=int, default=None,
                   help="fits per configuration in part 3, best taken "
                        "(default 2)")
    p.add_argument("--save-interval", type=float, default=None,
                   help="seconds between saves in part 3 (default 2.5; the "
                        "step count is derived from the measured step time)")
    p.add_argument("--save-freq", type=int, default=None,
                   help="save every N batches in part 3 (overrides "
                        "--save-interval)")
    p.add_argument("--saves", type=int, default=2,
                   help="saves inside the loop in part 3 (default 2)")
    p.add_argument("--stall-width", type=int, default=2048)
    p.add_argument("--stall-layers", type=int, default=2,
                   help="Dense layers of --stall-width (2 x 2048: ~100 MB "
                        "of state with Adam)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tmp-dir", default=os.path.join(RESULTS, "tmp-mirror"),
                   help="local checkpoints and downloads (on the disk); "
                        "removed afterwards")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    # SIGTERM (a timeout, a kill) still stops the emulators in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.size_mb = args.size_mb or (128 if args.quick else 1024)
    args.repeats = args.repeats or 1
    args.stall_repeats = args.stall_repeats or (1 if args.quick else 2)
    args.save_interval = args.save_interval or (2.0 if args.quick else 2.5)
    args.clouds = [c.strip() for c in args.clouds.split(",") if c.strip()]
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - {"default", "tuned"} or not args.variants:
        p.error("--variants: choose from default,tuned")
    if set(args.clouds) - set(CLOUDS) or not args.clouds:
        p.error(f"--clouds: choose from {','.join(CLOUDS)}")
    if parts - {"transfer", "stall"} or not parts:
        p.error("--parts: choose from transfer,stall")

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.tmp_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="mirror-", dir=args.tmp_dir)
    machine = machine_info(tmp)
    command = " ".join([os.path.relpath(sys.executable, ROOT),
                        os.path.relpath(__file__, ROOT)]
                       + (argv if argv is not None else sys.argv[1:]))
    print(f"# keras_ckpt mirror benchmark\n# {command}\n# machine: "
          f"{machine.get('nproc')} CPUs ({machine.get('cpu')}), "
          f"{machine.get('ram_gib')} GiB RAM, load average "
          f"{' '.join(f'{x:.1f}' for x in machine.get('loadavg_start', ()))}"
          f"\n# working under {tmp}", flush=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    report = {"command": command, "machine": machine, "started": started}
    t_all = time.perf_counter()
    ems = None
    try:
        t0 = time.perf_counter()
        try:
            ems = Emulators(args.clouds, tmp)
        except emulators.EmulatorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"emulators up in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{c} {e.endpoint}" for c, e in ems.running.items()),
              flush=True)
        report["versions"] = versions()
        if "transfer" in parts:
            print("\n## transfers", flush=True)
            t0 = time.perf_counter()
            report["transfer"] = run_transfers(args, ems, tmp)
            report["transfer"]["wall_s"] = time.perf_counter() - t0
            report["transfer"]["rows"] = summarize_transfers(
                report["transfer"], args.clouds)
        if "stall" in parts:
            print("\n## training stall", flush=True)
            t0 = time.perf_counter()
            report["stall"] = run_stall(args, ems, tmp)
            report["stall"]["wall_s"] = time.perf_counter() - t0
            report["stall"]["rows"] = summarize_stall(report["stall"],
                                                      args.clouds)
    finally:
        if ems is not None:
            ems.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.rmdir(args.tmp_dir)  # only if empty
        except OSError:
            pass
    report["total_s"] = time.perf_counter() - t_all
    try:
        report["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass

    def loads(key):
        return " ".join(f"{x:.1f}" for x in report["machine"].get(key, ()))

    found = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    text, md = [], [f"# keras_ckpt mirror benchmark — {started}", "",
                    f"`{command}`", "",
                    f"Machine: {machine.get('nproc')} CPUs "
                    f"({machine.get('cpu')}), {machine.get('ram_gib')} GiB "
                    f"RAM; load average at start {loads('loadavg_start')}, "
                    f"at end {loads('loadavg_end')}. Versions: {found}.", ""]
    if "transfer" in report:
        tr = report["transfer"]
        desc = (f"checkpoint {tr['checkpoint']['bytes'] / 1e6:.0f} MB "
                f"({len(tr['checkpoint']['files'])} files), best of "
                f"{args.repeats}; MB = 10^6 bytes; uploader settings "
                f"{tr['options']}")
        head, body = transfer_table(tr["rows"])
        text += [f"\n## Transfers: {desc}", render_text(head, body)]
        md += [f"## Transfers", "", desc + ".", "", render_md(head, body), "",
               "SDK calls: " + "; ".join(
                   f"{c} {d}: `{SDK_CALLS[c, d]}`" for c in args.clouds
                   for d in ("up", "down")) + ".", ""]
    if "stall" in report:
        st = report["stall"]
        desc = (f"{st['state_bytes'] / 1e6:.0f} MB of state, a save every "
                f"{st['save_freq']} steps (~{st['save_interval_s']:.1f} s; "
                f"step {st['step_s'] * 1000:.1f} ms), {st['saves']} saves in "
                f"{st['steps']} steps, best of {st['repeats']}")
        head, body = stall_table(st["rows"])
        text += [f"\n## Training stall: {desc}", render_text(head, body)]
        md += ["## Training stall", "", desc + ".", "",
               render_md(head, body), ""]
    print("\n".join(text), flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for base in (f"mirror-{stamp}", "mirror-latest"):
        with open(os.path.join(args.out, base + ".json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, base + ".md"), "w") as f:
            f.write("\n".join(md) + "\n")
    print(f"\ntotal {report['total_s']:.0f} s; results: "
          f"{os.path.relpath(os.path.join(args.out, f'mirror-{stamp}'), ROOT)}"
          ".{json,md} (and mirror-latest.{json,md})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
