"""SIGTERM -> preemption checkpoint on the mirror -> exit, timed from outside.

    .venv/bin/python benchmarks/preemption.py                     # 400MB, S3, grace 25 s
    .venv/bin/python benchmarks/preemption.py --size 100MB --host accel

A training job (a child process: the benchmark's Dense model with Adam, a
`keras_ckpt.Checkpoint(directory, mirror="s3://...", save_freq=N,
on_preemption="exit", preemption_grace_seconds=G)`) runs against moto's S3
server on loopback (started here, out of process, as `benchmarks/mirror.py`
does: `tests/emulators.py`). After batch `--at` this process sends it
SIGTERM, as a cloud does before it reclaims a VM, and measures from the
signal:

- `manifest_s`: when the preemption checkpoint's manifest (`ckpt-<N>.json`,
  N >= the batch of the signal) is listed on the mirror (polled every 50 ms:
  the checkpoint is then committed there, data first);
- `exit_s`, `exit_code`: when the job has exited, and how (143 expected).

Goal (issue 12): `exit_s <= 0.5 x grace`, the checkpoint on the mirror,
exit 143. Prints a summary, and with `--json` one JSON object on the last
line (what `benchmarks/run.py` reads for its goals table).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BUCKET = "bench-preemption"
PREFIX = "job"


def child(args):
    """The training job: prints `BATCH <global step>` after every batch."""
    from worker import build, configure_host, state_bytes

    configure_host(args.host)
    import keras

    import keras_ckpt

    model, data = build(args.width, args.layers, 8)
    print(f"STATE {state_bytes(model)}", flush=True)
    device_s = args.device_ms / 1000.0 if args.host == "accel" else 0.0

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            if device_s:
                time.sleep(device_s)
            self.step += 1
            print(f"BATCH {self.step}", flush=True)

    ckpt = keras_ckpt.Checkpoint(
        directory=args.dir, mirror=args.mirror, save_freq=args.save_freq,
        max_to_keep=2, async_save=True, on_preemption="exit",
        preemption_grace_seconds=args.grace, resume=False, verbose=1)
    model.fit(data, epochs=1, steps_per_epoch=args.at + 4 * args.save_freq,
              verbose=0, callbacks=[ckpt, Progress()])
    print("FIT RETURNED (no preemption?)", flush=True)


class MirrorWatch(threading.Thread):
    """Polls the S3 prefix for a manifest `ckpt-<N>.json` with N >= `step`."""

    def __init__(self, client, step):
        super().__init__(daemon=True)
        self.client, self.step = client, step
        self.t_signal = None
        self.found = None  # (seconds after the signal, checkpoint name)
        self.stop = threading.Event()

    def names(self):
        out = []
        resp = self.client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")
        for obj in resp.get("Contents", []):
            base = obj["Key"].rsplit("/", 1)[-1]
            if base.startswith("ckpt-") and base.endswith(".json"):
                try:
                    out.append(int(base[5:-5]))
                except ValueError:
                    pass
        return out

    def run(self):
        while not self.stop.is_set() and self.found is None:
            try:
                steps = [n for n in self.names() if n >= self.step]
            except Exception:  # the emulator is busy: try again
                steps = []
            if steps and self.t_signal is not None:
                self.found = (time.monotonic() - self.t_signal,
                              f"ckpt-{min(steps)}")
            time.sleep(0.05)


def measure(args):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import boto3

    import emulators  # tests/emulators.py
    from run import parse_size

    size, spec = parse_size(args.size)
    save_freq = args.save_freq
    moto = emulators.start_moto(in_process=False)
    tmp = tempfile.mkdtemp(prefix="preempt-", dir=args.tmp_dir)
    proc = None
    try:
        moto.create_bucket(BUCKET)
        env = dict(os.environ)
        env.update(moto.env())
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(ROOT, "src"), HERE, env.get("PYTHONPATH", "")])
        client = boto3.client("s3", endpoint_url=moto.endpoint,
                              region_name="us-east-1",
                              aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        cmd = [sys.executable, os.path.abspath(__file__), "--child",
               "--width", str(spec["width"]), "--layers", str(spec["layers"]),
               "--save-freq", str(save_freq), "--at", str(args.at),
               "--grace", str(args.grace), "--host", args.host,
               "--device-ms", str(args.device_ms),
               "--dir", os.path.join(tmp, "ckpt"),
               "--mirror", f"s3://{BUCKET}/{PREFIX}"]
        watch = MirrorWatch(client, args.at)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=ROOT, bufsize=1)
        tail, state = [], None
        t_signal = t_exit = None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("STATE "):
                state = int(line.split()[1])
            if (t_signal is None and line.startswith("BATCH ")
                    and int(line.split()[1]) >= args.at):
                watch.start()
                t_signal = time.monotonic()
                watch.t_signal = t_signal
                proc.send_signal(signal.SIGTERM)
                break
        if t_signal is None:
            proc.wait()
            return {"error": f"the job exited ({proc.returncode}) before "
                    f"batch {args.at}: " + " / ".join(tail[-5:])}
        reader = threading.Thread(
            target=lambda: tail.extend(l.rstrip() for l in proc.stdout),
            daemon=True)
        reader.start()
        try:
            proc.wait(timeout=args.grace * 2 + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t_exit = time.monotonic()
        reader.join(timeout=5)
        # A last look (a manifest that landed between two polls).
        watch.stop.set()
        watch.join(timeout=5)
        if watch.found is None:
            late = [n for n in watch.names() if n >= args.at]
            if late:
                watch.found = (t_exit - t_signal, f"ckpt-{min(late)}")
        return {
            "size": size, "state_bytes": state, "host": args.host,
            "device_ms": args.device_ms if args.host == "accel" else 0.0,
            "grace_s": args.grace, "save_freq": save_freq,
            "signal_batch": args.at, "mirror": "S3 (moto, loopback)",
            "manifest_s": watch.found[0] if watch.found else None,
            "checkpoint": watch.found[1] if watch.found else None,
            "exit_s": t_exit - t_signal, "exit_code": proc.returncode,
            # keras_ckpt's own lines (the notice, the commit, what was not
            # mirrored), or the end of a failure.
            "job_tail": [l for l in tail if l.startswith("keras_ckpt")][-6:]
            if proc.returncode == 143 else
            [l for l in tail if not l.startswith("BATCH ")][-8:],
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="400MB",
                   help="training state, e.g. 100MB, 400MB, 1GB")
    p.add_argument("--grace", type=float, default=25.0,
                   help="preemption_grace_seconds (the budget), default 25")
    p.add_argument("--save-freq", type=int, default=6)
    p.add_argument("--at", type=int, default=13,
                   help="SIGTERM after this batch (default 13: a save every "
                        "6, so the one of batch 12 may still be in flight)")
    p.add_argument("--host", choices=("cpu", "accel"), default="cpu")
    p.add_argument("--device-ms", type=float, default=0.0)
    p.add_argument("--tmp-dir", default=os.path.join(RESULTS, "tmp"))
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on the last line")
    # The child job's arguments.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--mirror", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.grace <= 0:
        p.error(f"Invalid value for argument `--grace`. Received: "
                f"{args.grace}. Expected a positive number of seconds.")
    os.makedirs(args.tmp_dir, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = measure(args)
    try:
        os.rmdir(args.tmp_dir)  # only if empty
    except OSError:
        pass
    if "error" in res:
        print(f"preemption benchmark failed: {res['error']}")
    else:
        ratio = res["exit_s"] / res["grace_s"]
        man = (f"{res['checkpoint']} on the mirror {res['manifest_s']:.1f} s "
               "after the signal" if res["manifest_s"] is not None
               else "NO preemption checkpoint on the mirror")
        ok = (ratio <= 0.5 and res["exit_code"] == 143
              and res["manifest_s"] is not None)
        print(f"{res['size']} ({(res['state_bytes'] or 0) / 1e6:.0f} MB) on "
              f"{res['host']}, S3 (moto): SIGTERM after batch "
              f"{res['signal_batch']}; {man}; exit {res['exit_code']} "
              f"{res['exit_s']:.1f} s after the signal = {ratio:.2f}x the "
              f"{res['grace_s']:.0f} s budget (goal <= 0.5x): "
              f"{'PASS' if ok else 'MISS'}")
        for line in res["job_tail"]:
            print("  job: " + line)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
