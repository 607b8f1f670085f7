"""Checkpointing cost, side by side: keras_ckpt (async and sync) vs TensorFlow
and Keras' own checkpointing, vs the memory and disk floors, on a CPU-bound
and an accelerator-like host, with issue 12's goals as PASS/MISS.

    .venv/bin/python benchmarks/run.py                 # full (make bench)
    .venv/bin/python benchmarks/run.py --quick         # smoke run, a few minutes
    .venv/bin/python benchmarks/run.py --sizes 100MB,1GB --repeats 2 --host cpu
    .venv/bin/python benchmarks/run.py --from-json benchmarks/results/latest.json --markdown

Every configuration trains the same model on the same data for the same
number of steps and saves at the same steps, in a fresh process (so its peak
RSS is its own); see `benchmarks/README.md` for what each column means.
Prints the goals table and one table per size and host mode, and writes
`benchmarks/results/bench-<time>.{json,md,png}` (and `latest.{json,md,png}`).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
WORKER = os.path.join(HERE, "worker.py")

CONFIGS = (
    "none", "kc_async", "kc_sync", "tf_manager", "keras_backup",
    "keras_mc_weights", "keras_mc_full",
)
# The growth sizes that are not in --sizes run only what the goals need.
GROWTH_CONFIGS = ("none", "kc_async", "keras_backup")
# Synchronous savers that no goal uses: in the accel host mode they run only
# at the smallest full-comparison size unless --all-accel (keeps `make bench`
# near half an hour on 2 cores).
REF_CONFIGS = ("tf_manager", "keras_mc_weights", "keras_mc_full")
HOSTS = ("cpu", "accel")
HOST_LABELS = {
    "cpu": "CPU-bound host, training on every core",
    "accel": "accelerator-like host, training on 1 core, 1 free",
}
LABELS = {
    "none": "fit, no checkpoints (baseline)",
    "kc_async": "keras_ckpt async",
    "kc_sync": "keras_ckpt sync",
    "tf_manager": "tf.train.CheckpointManager",
    "keras_backup": "keras BackupAndRestore",
    "keras_mc_weights": "keras ModelCheckpoint .weights.h5",
    "keras_mc_full": "keras ModelCheckpoint .keras",
    "raw": "raw write+fsync (disk floor)",
    "copy": "np.copy of the state (memory floor)",
}
# State = weights + 2 Adam moments = 3 x weights; a stack of square Dense
# layers of `width` holds 12 * width**2 bytes of state per layer (float32).
# `repeats`: paired fits (one without checkpoints, one with) per process for
# the baseline and keras_ckpt; the four reference configurations get
# `ref_repeats`, which keeps `make bench` near 10 minutes.
PRESETS = {
    "100MB": dict(width=2048, layers=2, save_freq=40, repeats=2,
                  ref_repeats=1),
    "400MB": dict(width=4096, layers=2, save_freq=8, repeats=1, ref_repeats=1),
    "1GB": dict(width=4096, layers=5, save_freq=8, repeats=1, ref_repeats=1),
    # 4 GB of state: ~3.3x the state in RAM per process (weights, Adam,
    # gradients, one snapshot); 2 saves, one pair: a step takes ~2 s.
    "4GB": dict(width=4096, layers=20, save_freq=4, repeats=1, ref_repeats=1,
                saves=2),
}
QUICK = dict(sizes="100MB", growth_sizes="100MB,300MB", saves=2, repeats=1,
             floor_repeats=2, configs="kc_async,kc_sync,keras_backup")


def parse_size(text):
    text = text.strip()
    key = text.upper().replace("IB", "B")
    for name, preset in PRESETS.items():
        if key == name:
            return name, dict(preset)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(MB|GB)", key)
    if not m:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected e.g. 100MB, 300MB, 1GB")
    nbytes = float(m.group(1)) * (1e6 if m.group(2) == "MB" else 1e9)
    width = 2048 if nbytes <= 300e6 else 4096
    layers = max(1, round(nbytes / (12 * width * width)))
    small = nbytes <= 300e6
    spec = dict(width=width, layers=layers, save_freq=40 if small else 8,
                repeats=2 if small else 1, ref_repeats=1)
    if nbytes >= 2.5e9:
        spec.update(save_freq=4, saves=2)
    return text, spec


def size_bytes(spec):
    """The state a spec builds: 3 x (float32 weights), the Dense(16) head
    left out (as the presets' names do)."""
    return 12 * spec["width"] ** 2 * spec["layers"]


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------
def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return ""


def machine_info(path):
    info = {"nproc": os.cpu_count(), "platform": platform.platform()}
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
        name = os.path.basename(dev)
        rot = f"/sys/block/{re.sub(r'p?[0-9]+$', '', name)}/queue/rotational"
        if not os.path.exists(rot):
            rot = f"/sys/block/{name}/queue/rotational"
        try:
            with open(rot) as f:
                info["disk"]["rotational"] = f.read().strip() == "1"
        except OSError:
            pass
        model = _cmd(["lsblk", "-dno", "MODEL,SIZE,TYPE", dev])
        if model:
            info["disk"]["lsblk"] = " ".join(model.split())
    return info


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------
def _busy_cpu_s():
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def other_load(interval=1.0):
    """CPU share used by other processes over `interval` (none of ours runs)."""
    b0 = _busy_cpu_s()
    time.sleep(interval)
    b1 = _busy_cpu_s()
    if b0 is None or b1 is None:
        return None
    return (b1 - b0) / (interval * (os.cpu_count() or 1))


def wait_until_idle(max_wait, threshold=0.10):
    """Waits up to `max_wait` s for other processes to leave the CPUs idle."""
    deadline = time.monotonic() + max_wait
    load = other_load(3.0)
    while load is not None and load > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = other_load(3.0)
    return load


def _children_cpu_s():
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_worker(config, size, spec, args, tmp_root, host="cpu"):
    cmd = [
        sys.executable, WORKER, "--config", config,
        "--width", str(spec["width"]), "--layers", str(spec["layers"]),
        "--batch", str(args.batch), "--save-freq", str(spec["save_freq"]),
        "--saves", str(spec.get("saves", args.saves)),
        "--host", host, "--device-ms", str(args.device_ms),
        "--repeats", str(spec["repeats"] if config in ("none", "kc_async",
                                                       "kc_sync")
                         else spec["ref_repeats"]),
        "--floor-repeats", str(args.floor_repeats), "--tmp-root", tmp_root,
    ]
    env = dict(os.environ)
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()
    busy0, mine0 = _busy_cpu_s(), _children_cpu_s()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.timeout * (
                                  4 if size_bytes(spec) > 2e9 else 1),
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - start
    busy1, mine1 = _busy_cpu_s(), _children_cpu_s()
    # Share of the machine's CPU used by *other* processes meanwhile: the
    # measurements assume an otherwise idle machine.
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (
            wall * (os.cpu_count() or 1))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"config": config, "error": f"exit {proc.returncode}",
                "stderr_tail": tail, "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    out["other_cpu_share"] = other
    return out


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def analyse(raw, spec, saves):
    """Derived metrics per configuration, from the workers' raw output.

    Each checkpointing process alternates a fit without checkpoints and a fit
    with them (see worker.py); a configuration's stall is measured against
    the baseline fits of its own process.
    """
    base = raw.get("none")
    if not base or "error" in base:
        return {}, None
    base_runs = base["runs"]
    base_rss = base["peak_rss_bytes"]
    N = spec["save_freq"]
    rows = {}
    for config in CONFIGS:
        res = raw.get(config)
        if res is None:
            continue
        if "error" in res:
            rows[config] = {"error": res["error"]}
            continue
        runs = [r for r in res["runs"] if r["config"] == config]
        paired = [r for r in res["runs"] if r["config"] == "none"] or runs
        base_loop = min(r["loop_s"] for r in paired)
        base_fit = min(r["fit_s"] for r in paired)
        base_step = _median([s for r in paired for s in r["step_s"][1:]])
        loop = min(r["loop_s"] for r in runs)
        row = {
            "loop_s": loop,
            "base_loop_s": base_loop,
            "fit_s": min(r["fit_s"] for r in runs),
            "steps": runs[0]["steps"],
            "peak_rss_bytes": res["peak_rss_bytes"],
            "rss_delta_bytes": res["peak_rss_bytes"] - base_rss,
            "throughput_vs_none": base_loop / loop,
            "fit_throughput_vs_none": base_fit / min(r["fit_s"] for r in runs),
            "other_cpu_share": res.get("other_cpu_share"),
            "after_last_batch_s": _median(
                r.get("after_last_batch_s") for r in runs),
        }
        if config != "none":
            row["stall_per_save_s"] = (loop - base_loop) / saves
            # Noise indicator: the same difference, pair by pair.
            row["stall_per_save_pairs_s"] = [
                (c["loop_s"] - b["loop_s"]) / saves
                for b, c in zip(paired, runs)] if paired is not runs else []
            row["hook_per_save_s"] = _median(r["hook_s"] for r in runs) / saves
            row["train_end_s"] = _median(r["train_end_s"] for r in runs)
            row["bytes"] = _median(r["bytes"] for r in runs)
            # Excess of the first step after each save over the baseline's
            # median step, callback time excluded: where the copy-on-write
            # of a held snapshot, or a write still running, shows up.
            excess = []
            for r in runs:
                for k in range(1, saves + 1):
                    i = k * N  # first step trained after save k
                    if i < len(r["step_s"]):
                        hook = r["hook_by_batch"].get(str(i), 0.0)
                        excess.append(r["step_s"][i] - hook - base_step)
            row["next_step_excess_s"] = _median(excess)
        if config.startswith("kc_"):
            # In-loop saves only (the final one, in on_train_end, competes
            # with nothing): write + commit + retention, as the job runs it.
            # (If keras_ckpt's internals moved and a method could not be
            # wrapped, the lists are empty: "n/a" in the tables.)
            row["untimed"] = sorted({u for r in runs
                                     for u in r.get("untimed", [])})
            per_save = [w + t for r in runs
                        for w, t in zip(r.get("write_s", [])[:saves],
                                        r.get("retain_s", [])[:saves])]
            row["write_s"] = _median(per_save)
            row["write_s_all"] = per_save
            final = [r["write_s"][-1] + r["retain_s"][-1] for r in runs
                     if len(r.get("write_s", [])) > saves
                     and r.get("retain_s")]
            row["final_write_s"] = _median(final)
            row["wait_in_loop_s"] = _median(r.get("wait_in_loop_s")
                                            for r in runs)
            row["wait_at_end_s"] = _median(r.get("wait_at_end_s")
                                           for r in runs)
            # Steps that began while an in-loop write was running (the first
            # step after each snapshot excluded), relative to the baseline
            # step: the cost of sharing the machine with the writer.
            during, busy = [], []
            for r in runs:
                if "step_begin" not in r or not r.get("write_s"):
                    continue
                windows = [(t0, t0 + w) for t0, w in zip(
                    r["write_start"][:saves], r["write_s"][:saves])]
                after = {k * N for k in range(1, saves + 1)}
                for i, (t, d) in enumerate(zip(r["step_begin"], r["step_s"])):
                    if i not in after and any(a <= t < b for a, b in windows):
                        during.append(d)
                loop_start = r["step_begin"][0]
                loop_end = loop_start + r["loop_s"]
                busy.append(sum(max(0.0, min(b, loop_end) - max(a, loop_start))
                                for a, b in windows) / r["loop_s"])
            if during and busy and config == "kc_async":
                row["step_during_write_x"] = _median(during) / base_step
                row["writer_busy_share"] = _median(busy)
        elif config != "none":
            row["write_s"] = row["hook_per_save_s"]  # synchronous: the hook
        if row.get("write_s") is not None and row.get("write_s") > 0 \
                and row.get("bytes"):
            row["write_mbps"] = row["bytes"] / row["write_s"] / 1e6
        rows[config] = row
    floors = base.get("floors")
    if floors:
        rows["raw"] = {
            "bytes": floors["raw_write_bytes"],
            "write_s": _median(floors["raw_write_s"]),
            "write_s_all": floors["raw_write_s"],
        }
        rows["raw"]["write_mbps"] = rows["raw"]["bytes"] / rows["raw"][
            "write_s"] / 1e6
        rows["raw"]["best_mbps"] = rows["raw"]["bytes"] / min(
            floors["raw_write_s"]) / 1e6
        rows["copy"] = {
            "bytes": floors["copy_bytes"], "copy_s": min(floors["copy_s"]),
            "copy_s_all": floors["copy_s"],
        }
    base_step = _median([s for r in base_runs for s in r["step_s"][1:]])
    context = {"base_loop_s": min(r["loop_s"] for r in base_runs),
               "base_step_s": base_step,
               "save_interval_s": base_step * N, "save_freq": N,
               "state_bytes": base["state_bytes"], "params": base["params"],
               "steps": base_runs[0]["steps"], "saves": saves,
               "repeats": spec["repeats"], "ref_repeats": spec["ref_repeats"],
               "versions": base.get("versions"), "host": base.get("host"),
               "device_ms": base.get("device_ms")}
    return rows, context


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def _f(value, fmt, missing="-"):
    return missing if value is None else format(value, fmt)


def table(rows, ctx):
    head = ["config", "ckpt MB", "in-hook s/save", "stall s/save (fit Δ)",
            "stall ×sync", "next step +s", "write s", "write MB/s", "×raw",
            "fit returns +s", "steps/s ×none", "peak RSS GB (Δ)", "other load"]
    sync_stall = rows.get("kc_sync", {}).get("stall_per_save_s")
    raw_mbps = rows.get("raw", {}).get("write_mbps")
    body = []
    for config in CONFIGS + ("raw", "copy"):
        r = rows.get(config)
        if r is None:
            continue
        if "error" in r:
            body.append([LABELS[config], f"ERROR: {r['error']}"]
                        + [""] * (len(head) - 2))
            continue
        if config == "copy":
            body.append([LABELS[config], _f(r["bytes"] / 1e6, ".0f"),
                         "", "", "", "", _f(r["copy_s"], ".3f"),
                         _f(r["bytes"] / r["copy_s"] / 1e6, ".0f"), "", "",
                         "", "", ""])
            continue
        pairs = r.get("stall_per_save_pairs_s") or []
        stall = r.get("stall_per_save_s")
        rss = r.get("peak_rss_bytes")
        body.append([
            LABELS[config],
            _f(r["bytes"] / 1e6 if r.get("bytes") else None, ".0f"),
            _f(r.get("hook_per_save_s"), ".3f"),
            _f(stall, ".3f") + (
                f" [{min(pairs):.2f}..{max(pairs):.2f}]" if len(pairs) > 1
                else ""),
            _f(stall / sync_stall if stall is not None and sync_stall
               and sync_stall > 0 else None, ".2f"),
            _f(r.get("next_step_excess_s"), ".3f"),
            _f(r.get("write_s"), ".3f"),
            _f(r.get("write_mbps"), ".0f"),
            _f(r["write_mbps"] / raw_mbps if r.get("write_mbps")
               and raw_mbps else None, ".2f"),
            _f(r.get("after_last_batch_s", r.get("train_end_s")), ".3f"),
            _f(r.get("throughput_vs_none"), ".3f"),
            "-" if rss is None else (
                f"{rss / 2**30:.2f}" + ("" if config == "none" else
                                        f" ({r['rss_delta_bytes'] / 2**30:+.2f})")),
            _f(r["other_cpu_share"] * 100 if r.get("other_cpu_share")
               is not None else None, ".0f") + ("%" if r.get(
                   "other_cpu_share") is not None else ""),
        ])
    return head, body


def render_text(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])]
                     + [line(r) for r in body])


def render_md(head, body):
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(out)


def describe(size, ctx):
    return (f"state {ctx['state_bytes'] / 1e6:.0f} MB ({ctx['params'] / 1e6:.1f}M "
            f"params + Adam moments), {ctx['steps']} steps, a save every "
            f"{ctx['save_freq']} steps (~{ctx['save_interval_s']:.2f} s; "
            f"baseline step {ctx['base_step_s'] * 1000:.0f} ms), "
            f"{ctx['saves']} saves in the loop, best of {ctx['repeats']} paired "
            f"runs (keras_ckpt) / {ctx['ref_repeats']} (others)")


def stall_origin(a, saves):
    """One line: where keras_ckpt async's stall comes from (or None)."""
    if a.get("step_during_write_x") is None:
        return None
    return (f"{a['hook_per_save_s']:.3f} s/save in the hooks (of which "
            f"waiting for the previous write "
            f"{(a.get('wait_in_loop_s') or 0.0) / saves:.3f} s), first step "
            f"after a snapshot +{a['next_step_excess_s']:.3f} s "
            f"(copy-on-write), steps while the writer runs "
            f"x{a['step_during_write_x']:.2f} the baseline step; the writer "
            f"was busy {a['writer_busy_share']:.0%} of the loop")


def _saves_of(raw, default):
    for res in raw.values():
        if isinstance(res, dict) and res.get("runs"):
            return res["runs"][0].get("saves", default)
    return default


def analyse_report(report):
    """{host: {size: (spec, rows, ctx)}} of a report, sizes ordered by state."""
    out = {}
    for host, entry in report["hosts"].items():
        sizes = {}
        for size, e in entry.get("sizes", {}).items():
            saves = _saves_of(e["raw"], e["spec"].get("saves", 3))
            rows, ctx = analyse(e["raw"], e["spec"], saves)
            sizes[size] = (e["spec"], rows, ctx)
        out[host] = dict(sorted(
            sizes.items(), key=lambda kv: size_bytes(kv[1][0])))
    return out


def size_table(size, by_host):
    """One table of one size, every host mode's rows in it."""
    head = body = None
    notes = []
    for host, (spec, rows, ctx) in by_host.items():
        if ctx is None:
            notes.append(f"{host}: the baseline failed; no rows.")
            continue
        h, b = table(rows, ctx)
        head = ["host"] + h
        body = (body or []) + [[host] + r for r in b]
        notes.append(f"{host} ({HOST_LABELS.get(host, host)}): "
                     f"{describe(size, ctx)}.")
        origin = stall_origin(rows.get("kc_async", {}), ctx["saves"])
        if origin:
            notes.append(f"{host}: keras_ckpt async, where the stall comes "
                         f"from: {origin}.")
    return head, body, notes


# ---------------------------------------------------------------------------
# Goals (issue 12), each a ratio of two things measured in the same run
# ---------------------------------------------------------------------------
# (key, goal text, {host: limit}, "<=" or ">="). A host without a limit gets
# its value reported as "info": the issue sets no goal for it there.
GOALS = (
    ("vs_backup", "async fit time added per save / BackupAndRestore's",
     {"cpu": 0.25, "accel": 0.1}, "<="),
    ("vs_copy", "async fit time added per save / in-memory copy of the state",
     {"accel": 2.0}, "<="),
    ("fit_return", "`fit` returns after the last batch (final checkpoint "
     "committed, flushed) / one raw write+fsync of the state",
     {"cpu": 1.5, "accel": 1.5}, "<="),
    ("write_rate", "background write throughput / raw write+fsync "
     "(a core free)", {"accel": 0.8}, ">="),
    # 1x the state, +5%: the issue counts today's +1.03 GB per GB as met
    # ("keep it"); the rest is the allocator's and TensorFlow's slack.
    ("memory", "peak extra memory / the state", {"cpu": 1.05, "accel": 1.05},
     "<="),
)
GROWTH_LIMIT = 1.1  # fitted exponent: 1 = linear, +0.1 for noise
PREEMPTION_LIMIT = 0.5
NOISY = 0.10  # other processes' CPU share above which a number is flagged


def _noisy(rows, *configs):
    loads = [rows.get(c, {}).get("other_cpu_share") for c in configs]
    loads = [x for x in loads if x is not None]
    return bool(loads) and max(loads) > NOISY


def _goal_value(key, rows, ctx):
    """(measured text, ratio) of one goal at one size, or (reason, None)."""
    a, b = rows.get("kc_async", {}), rows.get("keras_backup", {})
    raw, copy = rows.get("raw", {}), rows.get("copy", {})
    if "error" in a:
        return f"n/a (keras_ckpt async: {a['error']})", None
    stall = a.get("stall_per_save_s")
    if key == "vs_backup":
        other = b.get("stall_per_save_s")
        if stall is None or other is None:
            return "n/a", None
        if other <= 0:
            return (f"{stall:.3f} / {other:.3f} s: BackupAndRestore's stall "
                    "<= 0 (noise)"), None
        return f"{stall:.3f} / {other:.3f} s", stall / other
    if key == "vs_copy":
        if stall is None or not copy.get("copy_s"):
            return "n/a", None
        return f"{stall:.3f} / {copy['copy_s']:.3f} s", stall / copy["copy_s"]
    if key == "fit_return":
        tail, disk = a.get("after_last_batch_s"), raw.get("write_s")
        if tail is None or not disk:
            return "n/a", None
        return f"{tail:.2f} / {disk:.2f} s", tail / disk
    if key == "write_rate":
        mine, disk = a.get("write_mbps"), raw.get("write_mbps")
        if mine is None or not disk:
            return "n/a" + (" (write path not timed: " + ", ".join(
                a["untimed"]) + ")" if a.get("untimed") else ""), None
        return f"{mine:.0f} / {disk:.0f} MB/s", mine / disk
    if key == "memory":
        extra = a.get("rss_delta_bytes")
        if extra is None:
            return "n/a", None
        return (f"{extra / 1e9:+.2f} / {ctx['state_bytes'] / 1e9:.2f} GB",
                extra / ctx["state_bytes"])
    raise ValueError(key)


def _verdict(ratio, limit, op):
    if ratio is None:
        return "n/a"
    if limit is None:
        return "info"
    ok = ratio <= limit if op == "<=" else ratio >= limit
    return "PASS" if ok else "MISS"


def growth_fit(sizes, config="kc_async"):
    """Fitted exponent b of stall/save ~ state**b, with its points."""
    import math

    pts = []
    for spec, rows, ctx in sizes.values():
        if ctx is None:
            continue
        stall = rows.get(config, {}).get("stall_per_save_s")
        if stall is not None and stall > 0:
            pts.append((ctx["state_bytes"], stall))
    if len(pts) < 2:
        return None, pts
    xs = [math.log(x) for x, _ in pts]
    ys = [math.log(y) for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return None, pts
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den, pts


def evaluate_goals(analysed, preemption):
    """Rows {goal, size, limits, cells: {host: (measured, verdict)}}."""
    hosts = list(analysed)
    all_sizes = sorted({s for h in hosts for s in analysed[h]},
                       key=lambda s: min(size_bytes(analysed[h][s][0])
                                         for h in hosts if s in analysed[h]))
    out = []
    for key, text, limits, op in GOALS:
        for size in all_sizes:
            cells = {}
            for host in hosts:
                if size not in analysed[host]:
                    continue
                spec, rows, ctx = analysed[host][size]
                if ctx is None:
                    cells[host] = ("n/a (baseline failed)", "n/a")
                    continue
                measured, ratio = _goal_value(key, rows, ctx)
                if ratio is not None:
                    measured += f" = {ratio:.2f}x"
                    if _noisy(rows, "none", "kc_async", "keras_backup"):
                        measured += " *"
                cells[host] = (measured, _verdict(ratio, limits.get(host),
                                                  op))
            if cells:
                out.append({"goal": text, "size": size, "op": op,
                            "limits": limits, "cells": cells})
    cells = {}
    for host in hosts:
        b, pts = growth_fit(analysed[host])
        if b is None:
            cells[host] = (f"n/a ({len(pts)} size(s) with a positive stall)",
                           "n/a")
            continue
        lo, hi = min(pts), max(pts)
        cells[host] = (
            f"exponent {b:.2f} ({lo[1]:.3f} s at {lo[0] / 1e6:.0f} MB .. "
            f"{hi[1]:.3f} s at {hi[0] / 1e6:.0f} MB)",
            _verdict(b, GROWTH_LIMIT, "<="))
    out.append({"goal": "growth: async stall per save vs state size, "
                "fitted exponent (1 = linear)", "size": "all", "op": "<=",
                "limits": {h: GROWTH_LIMIT for h in hosts}, "cells": cells})
    cells = {}
    for host in hosts:
        p = (preemption or {}).get(host)
        if not p:
            continue
        if "error" in p:
            cells[host] = (f"n/a ({p['error']})", "n/a")
            continue
        ratio = p["exit_s"] / p["grace_s"]
        ok = (ratio <= PREEMPTION_LIMIT and p.get("exit_code") == 143
              and p.get("manifest_s") is not None)
        man = (f"on the mirror at {p['manifest_s']:.1f} s"
               if p.get("manifest_s") is not None else "NOT on the mirror")
        cells[host] = (f"{p['exit_s']:.1f} / {p['grace_s']:.0f} s = "
                       f"{ratio:.2f}x (checkpoint {man}, exit "
                       f"{p.get('exit_code')})", "PASS" if ok else "MISS")
    if cells:
        size = next(iter((preemption or {}).values()), {}).get("size", "")
        out.append({"goal": "SIGTERM -> preemption checkpoint on the S3 "
                    "mirror -> exit / the grace budget", "size": size,
                    "op": "<=", "limits": {h: PREEMPTION_LIMIT for h in hosts},
                    "cells": cells})
    return out


def goals_table(goals, hosts):
    head = ["goal", "size"]
    for host in hosts:
        head += [f"{host}: measured", f"{host}: goal", f"{host}"]
    body = []
    for g in goals:
        row = [g["goal"], g["size"]]
        for host in hosts:
            measured, verdict = g["cells"].get(host, ("-", "-"))
            limit = g["limits"].get(host)
            row += [measured, "-" if limit is None else
                    f"{g['op']} {limit:g}" + ("x" if "exponent" not in
                                               g["goal"] else ""), verdict]
        body.append(row)
    return head, body


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------
def plot(analysed, path):
    """Stall per save and write throughput vs state size, every config, one
    column per host mode. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot",
              file=sys.stderr)
        return None
    hosts = list(analysed)
    fig, axes = plt.subplots(2, len(hosts), figsize=(6.5 * len(hosts), 8.5),
                             squeeze=False)
    for col, host in enumerate(hosts):
        sizes = [v for v in analysed[host].values() if v[2] is not None]
        for config in CONFIGS[1:] + ("raw",):
            pts_stall, pts_rate = [], []
            for spec, rows, ctx in sizes:
                r = rows.get(config, {})
                mb = ctx["state_bytes"] / 1e6
                if r.get("stall_per_save_s") is not None:
                    pts_stall.append((mb, r["stall_per_save_s"]))
                if r.get("write_mbps") is not None:
                    pts_rate.append((mb, r["write_mbps"]))
            style = dict(marker="o", label=LABELS[config])
            if config == "raw":
                style.update(linestyle="--", color="black", marker="s")
            if pts_stall:
                axes[0][col].plot(*zip(*sorted(pts_stall)), **style)
            if pts_rate:
                axes[1][col].plot(*zip(*sorted(pts_rate)), **style)
        copies = sorted((ctx["state_bytes"] / 1e6, rows["copy"]["copy_s"])
                        for _, rows, ctx in sizes if "copy" in rows)
        if copies:
            axes[0][col].plot(*zip(*copies), linestyle=":", color="gray",
                              marker="s", label=LABELS["copy"])
        axes[0][col].set_title(f"stall per save — {HOST_LABELS.get(host, host)}",
                               fontsize=10)
        axes[0][col].set_ylabel("fit time added per save (s)")
        axes[1][col].set_title(f"write throughput — {host}", fontsize=10)
        axes[1][col].set_ylabel("MB/s (keras_ckpt: background write)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_xlabel("training state (MB)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].axhline(0, color="black", linewidth=0.5)
        # Log-like above 0.05 s (linear growth reads as a slope of 1), and
        # still showing a stall that noise made negative.
        axes[0][col].set_yscale("symlog", linthresh=0.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    h2, l2 = axes[1][0].get_legend_handles_labels()
    for h, l in zip(h2, l2):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Rendering a report (a run just finished, or a saved JSON)
# ---------------------------------------------------------------------------
def normalize(report):
    """Reports before host modes (one `sizes` dict) are CPU-bound runs."""
    if "hosts" not in report:
        report = dict(report)
        report["hosts"] = {"cpu": {"sizes": report.pop("sizes", {})}}
    return report


def render_report(report):
    """(text, markdown lines, goals) of a whole report."""
    report = normalize(report)
    analysed = analyse_report(report)
    hosts = list(analysed)
    preemption = {h: e["preemption"] for h, e in report["hosts"].items()
                  if e.get("preemption")}
    goals = evaluate_goals(analysed, preemption)
    gh, gb = goals_table(goals, hosts)
    text = ["", "=" * 30 + " issue 12's goals " + "=" * 30,
            render_text(gh, gb)]
    md = ["### Goals", "", render_md(gh, gb).replace(
        "|---:|---:|", "|---|---:|", 1), ""]
    flagged = any(" *" in c[0] for g in goals for c in g["cells"].values())
    foot = ("* other processes used more than "
            f"{NOISY:.0%} of the CPUs while this was measured: indicative only.")
    if flagged:
        text.append(foot)
        md += [foot, ""]
    legend = ("Each value is keras_ckpt async against the other measurement "
              "of the same run (`a / b = ratio`); `info`: the issue sets no "
              "goal for that host mode. Hosts: " + "; ".join(
                  f"{h} = {HOST_LABELS.get(h, h)}" for h in hosts)
              + (f"; accel adds a {report.get('device_ms')} ms device wait "
                 "per step" if report.get("device_ms") else "") + ".")
    md += [legend, ""]
    text.append(legend)
    all_sizes = []
    for host in hosts:
        for size in analysed[host]:
            if size not in all_sizes:
                all_sizes.append(size)
    all_sizes.sort(key=lambda s: min(size_bytes(analysed[h][s][0])
                                     for h in hosts if s in analysed[h]))
    for size in all_sizes:
        by_host = {h: analysed[h][size] for h in hosts if size in analysed[h]}
        head, body, notes = size_table(size, by_host)
        text += ["", f"## {size}"] + notes + (
            [render_text(head, body)] if body else [])
        md += [f"### {size} of state", ""] + [f"- {n}" for n in notes] + [""]
        if body:
            md += [render_md(head, body).replace(
                "|---:|---:|", "|---|---:|", 1), ""]
    for host, p in preemption.items():
        if "error" not in p:
            line = (f"Preemption ({host}): {p['size']} of state, mirror "
                    f"{p.get('mirror', 'S3 (moto)')}, SIGTERM after batch "
                    f"{p['signal_batch']} (a save every {p['save_freq']}); "
                    f"checkpoint {p.get('checkpoint')} on the mirror "
                    f"{p['manifest_s'] if p.get('manifest_s') is not None else float('nan'):.1f} s"
                    f" after the signal, exit {p['exit_code']} at "
                    f"{p['exit_s']:.1f} s; budget {p['grace_s']:.0f} s.")
        else:
            line = f"Preemption ({host}): {p['error']}"
        text.append(line)
        md += [line, ""]
    return "\n".join(text), md, goals, analysed


def rerender(path, markdown=False):
    """Renders a saved report again: tables, goals, plot (after changing the
    analysis, or to paste the run of record into docs/performance.md)."""
    with open(path) as f:
        report = normalize(json.load(f))
    text, md, _, analysed = render_report(report)
    stem = os.path.splitext(path)[0] + ".rerendered"
    png = plot(analysed, stem + ".png")
    header = [f"# keras_ckpt checkpoint benchmark — {report.get('started')}",
              "", f"`{report.get('command')}`", "",
              f"Machine: {report.get('machine')}", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(header + md) + "\n")
    if markdown:
        print("\n".join(md))
    else:
        print(text)
    print(f"\nwrote {stem}.md" + (f", {png}" if png else ""),
          file=sys.stderr if markdown else sys.stdout)
    return 0


# ---------------------------------------------------------------------------
# Preemption (benchmarks/preemption.py in its own process)
# ---------------------------------------------------------------------------
def run_preemption(args, host):
    cmd = [sys.executable, os.path.join(HERE, "preemption.py"),
           "--size", args.preemption_size, "--grace", str(args.grace),
           "--host", host, "--device-ms", str(args.device_ms),
           "--tmp-dir", args.tmp_dir, "--json"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get(
        "PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s",
                "size": args.preemption_size}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail),
                "size": args.preemption_size}
    return dict(json.loads(lines[-1]), size=args.preemption_size)


# ---------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100MB (+300MB for growth), the goals' "
                        "configs, 2 saves, 1 repeat, both hosts")
    p.add_argument("--host", choices=("cpu", "accel", "both"), default="both",
                   help="cpu: training on every core; accel: an accelerator-"
                        "like host, training on one core (TF intra/inter-op "
                        "threads = 1), the other free; both (default)")
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="accel: also wait this long per step, as for a "
                        "device step (default 0)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated total state sizes for the full "
                        "comparison, e.g. 100MB,1GB (default: 100MB,1GB)")
    p.add_argument("--growth-sizes", default=None,
                   help="sizes for the growth goal; those not in --sizes run "
                        "only " + ", ".join(GROWTH_CONFIGS) + " (default: "
                        "100MB,400MB,1GB,4GB; '' for none)")
    p.add_argument("--configs", default=",".join(CONFIGS[1:]),
                   help="comma-separated subset of: " + ", ".join(CONFIGS[1:])
                   + " (the baseline always runs)")
    p.add_argument("--all-accel", action="store_true",
                   help="accel host: run " + ", ".join(REF_CONFIGS) + " at "
                        "every --sizes size (default: the smallest only)")
    p.add_argument("--saves", type=int, default=3,
                   help="saves inside the training loop (default 3; 2 at 4GB)")
    p.add_argument("--repeats", type=int, default=None,
                   help="paired fits per configuration, best taken (default:"
                        " 2 for ~100MB, 1 above; 1 for the non-keras_ckpt "
                        "configurations)")
    p.add_argument("--save-freq", type=int, default=None,
                   help="save every N batches (default: 40 for ~100MB, 8 "
                        "up to ~1GB, 4 at 4GB)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--floor-repeats", type=int, default=3)
    p.add_argument("--preemption-size", default="400MB",
                   help="state of the SIGTERM -> mirror -> exit run "
                        "(benchmarks/preemption.py); 'none' to skip")
    p.add_argument("--grace", type=float, default=25.0,
                   help="preemption_grace_seconds of that run (default 25)")
    p.add_argument("--tmp-dir", default=os.path.join(RESULTS, "tmp"),
                   help="where checkpoints are written (must be on the "
                        "disk to measure, not tmpfs); removed afterwards")
    p.add_argument("--timeout", type=int, default=420,
                   help="seconds per configuration process (x4 above 2 GB)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for "
                        "other processes to use < 10%% of the CPUs")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--from-json", metavar="PATH",
                   help="re-render the goals, tables and plot of a saved "
                        "results JSON; runs nothing")
    p.add_argument("--markdown", action="store_true",
                   help="with --from-json: print the markdown of the goals "
                        "and tables (docs/performance.md's results section)")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, markdown=args.markdown)
    if args.quick:
        args.sizes = args.sizes or QUICK["sizes"]
        if args.growth_sizes is None:
            args.growth_sizes = QUICK["growth_sizes"]
        args.saves = QUICK["saves"]
        args.repeats = args.repeats or QUICK["repeats"]
        args.floor_repeats = QUICK["floor_repeats"]
        if args.configs == ",".join(CONFIGS[1:]):
            args.configs = QUICK["configs"]
    args.sizes = args.sizes or "100MB,1GB"
    if args.growth_sizes is None:
        args.growth_sizes = "100MB,400MB,1GB,4GB"
    configs = ["none"] + [c.strip() for c in args.configs.split(",")
                          if c.strip() and c.strip() != "none"]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs: {sorted(unknown)}")
    hosts = HOSTS if args.host == "both" else (args.host,)
    full = [parse_size(s)[0] for s in args.sizes.split(",") if s.strip()]
    plan = {}  # size -> (spec, configs)
    for text in args.sizes.split(",") + args.growth_sizes.split(","):
        if not text.strip():
            continue
        size, spec = parse_size(text)
        if size in plan:
            continue
        if args.repeats:
            spec["repeats"] = spec["ref_repeats"] = args.repeats
        if args.save_freq:
            spec["save_freq"] = args.save_freq
        spec.setdefault("saves", args.saves)
        plan[size] = (spec, configs if size in full else
                      [c for c in GROWTH_CONFIGS if c in configs or
                       c == "none"])
    plan = dict(sorted(plan.items(), key=lambda kv: size_bytes(kv[1][0])))

    # SIGTERM (a CI timeout, `kill`) -> SystemExit, so the worker process is
    # killed and the checkpoints under --tmp-dir are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.tmp_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix="bench-", dir=args.tmp_dir)
    machine = machine_info(tmp_root)
    fs = machine.get("disk", {}).get("fs")
    if fs in ("tmpfs", "ramfs"):
        print(f"warning: {tmp_root} is on {fs}; disk numbers will be "
              "meaningless. Pass --tmp-dir on a real disk.", file=sys.stderr)
    command = " ".join([os.path.relpath(sys.executable, ROOT),
                        os.path.relpath(__file__, ROOT)]
                       + (argv if argv is not None else sys.argv[1:]))
    print(f"# keras_ckpt checkpoint benchmark\n# {command}\n# machine: "
          f"{machine.get('nproc')} CPUs ({machine.get('cpu')}), "
          f"{machine.get('ram_gib')} GiB RAM, disk {machine.get('disk')}\n"
          f"# hosts: {', '.join(hosts)}; sizes: " + ", ".join(
              f"{s} ({len(c)} configs)" for s, (_, c) in plan.items())
          + f"\n# writing under {tmp_root}", flush=True)

    report = {"command": command, "machine": machine,
              "hosts": {h: {"sizes": {}} for h in hosts},
              "device_ms": args.device_ms,
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    t_all = time.perf_counter()
    try:
        for host in hosts:
            smallest = min((s for s in plan if s in full),
                           key=lambda s: size_bytes(plan[s][0]), default=None)
            for size, (spec, size_configs) in plan.items():
                if host == "accel" and size != smallest and not args.all_accel:
                    size_configs = [c for c in size_configs
                                    if c not in REF_CONFIGS]
                need = 3.4 * size_bytes(spec)
                avail = mem_available()
                raw = {}
                if avail is not None and need > avail:
                    print(f"[{host} {size}] skipped: needs ~{need / 2**30:.1f}"
                          f" GiB of RAM, {avail / 2**30:.1f} GiB available",
                          flush=True)
                    continue
                for config in size_configs:
                    if args.wait_idle:
                        w = time.perf_counter()
                        wait_until_idle(args.wait_idle)
                        report["waited_s"] = report.get("waited_s", 0.0) + (
                            time.perf_counter() - w)
                    t = time.perf_counter()
                    print(f"[{host} {size}] {config} ...", end=" ",
                          flush=True)
                    raw[config] = run_worker(config, size, spec, args,
                                             tmp_root, host)
                    err = raw[config].get("error")
                    other = raw[config].get("other_cpu_share")
                    busy = other is not None and other > 0.05
                    print(f"{time.perf_counter() - t:.0f} s"
                          + (f"  (other processes used {other:.0%} of the "
                             "CPUs meanwhile: numbers are noisy)" if busy
                             else "")
                          + (f"  ERROR {err}: " + "\n".join(
                              raw[config].get("stderr_tail", [])) if err
                             else ""), flush=True)
                report["hosts"][host]["sizes"][size] = {"spec": spec,
                                                        "raw": raw}
                rows, ctx = analyse(raw, spec, spec["saves"])
                if ctx is not None:
                    head, body = table(rows, ctx)
                    print(f"\n## {host} {size}: {describe(size, ctx)}\n"
                          + render_text(head, body) + "\n", flush=True)
            if args.preemption_size.lower() != "none":
                t = time.perf_counter()
                print(f"[{host}] preemption {args.preemption_size} on S3 "
                      "(moto) ...", end=" ", flush=True)
                res = run_preemption(args, host)
                report["hosts"][host]["preemption"] = res
                print(f"{time.perf_counter() - t:.0f} s"
                      + (f"  ERROR {res['error']}" if "error" in res else
                         f"  exit {res.get('exit_code')} after "
                         f"{res.get('exit_s', 0):.1f} s"), flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        try:
            os.rmdir(args.tmp_dir)  # only if empty
        except OSError:
            pass
    report["total_s"] = time.perf_counter() - t_all
    text, md, goals, analysed = render_report(report)
    print(text, flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    header = [f"# keras_ckpt checkpoint benchmark — {report['started']}", "",
              f"`{command}`", "",
              f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu')}), "
              f"{machine.get('ram_gib')} GiB RAM, disk {machine.get('disk')}.",
              ""]
    paths = []
    png = plot(analysed, os.path.join(args.out, f"bench-{stamp}.png"))
    if png:
        shutil.copyfile(png, os.path.join(args.out, "latest.png"))
        header += [f"![stall and throughput vs state size]"
                   f"({os.path.basename(png)})", ""]
    for name in (f"bench-{stamp}", "latest"):
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write("\n".join(header + md) + "\n")
        paths.append(os.path.join(args.out, name))
    waited = report.get("waited_s")
    print(f"\ntotal {report['total_s']:.0f} s"
          + (f" ({waited:.0f} s of it waiting for an idle machine)"
             if waited else "") + "; results: "
          f"{os.path.relpath(paths[0], ROOT)}.{{json,md"
          + (",png" if png else "") + "} (and latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
