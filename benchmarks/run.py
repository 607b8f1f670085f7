"""Checkpointing cost, side by side: keras_ckpt (async and sync) vs TensorFlow
and Keras' own checkpointing, vs the memory and disk floors.

    .venv/bin/python benchmarks/run.py                 # full (make bench), ~10 min
    .venv/bin/python benchmarks/run.py --quick         # smoke run, ~1 min
    .venv/bin/python benchmarks/run.py --sizes 100MB,1GB --repeats 2

Every configuration trains the same model on the same data for the same
number of steps and saves at the same steps, in a fresh process (so its peak
RSS is its own); see `benchmarks/README.md` for what each column means.
Prints a table and writes `benchmarks/results/bench-<time>.{json,md}` (and
`latest.{json,md}`).
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
    "100MB": dict(width=2048, layers=2, save_freq=40, repeats=3,
                  ref_repeats=2),
    "1GB": dict(width=4096, layers=5, save_freq=8, repeats=2, ref_repeats=1),
}
QUICK = dict(sizes="100MB", saves=2, repeats=1, floor_repeats=2)


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
    return text, dict(width=width, layers=layers,
                      save_freq=40 if small else 8,
                      repeats=3 if small else 2, ref_repeats=2 if small else 1)


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


def run_worker(config, size, spec, args, tmp_root):
    cmd = [
        sys.executable, WORKER, "--config", config,
        "--width", str(spec["width"]), "--layers", str(spec["layers"]),
        "--batch", str(args.batch), "--save-freq", str(spec["save_freq"]),
        "--saves", str(args.saves),
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
                              timeout=args.timeout, cwd=ROOT)
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
            per_save = [w + t for r in runs
                        for w, t in zip(r["write_s"][:saves],
                                        r["retain_s"][:saves])]
            row["write_s"] = _median(per_save)
            row["write_s_all"] = per_save
            final = [r["write_s"][-1] + r["retain_s"][-1] for r in runs
                     if len(r["write_s"]) > saves]
            row["final_write_s"] = _median(final)
            row["wait_in_loop_s"] = _median(r["wait_in_loop_s"] for r in runs)
            row["wait_at_end_s"] = _median(r["wait_at_end_s"] for r in runs)
            # Steps that began while an in-loop write was running (the first
            # step after each snapshot excluded), relative to the baseline
            # step: the cost of sharing the machine with the writer.
            during, busy = [], []
            for r in runs:
                if "step_begin" not in r:
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
            if during and config == "kc_async":
                row["step_during_write_x"] = _median(during) / base_step
                row["writer_busy_share"] = _median(busy)
        elif config != "none":
            row["write_s"] = row["hook_per_save_s"]  # synchronous: the hook
        if row.get("write_s") and row.get("bytes"):
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
               "versions": base.get("versions")}
    return rows, context


def targets(rows, ctx, size_bytes):
    """The issue's targets: (name, measured, goal, PASS/MISS/n/a, note)."""
    out = []
    a, s = rows.get("kc_async", {}), rows.get("kc_sync", {})
    copy, raw = rows.get("copy", {}), rows.get("raw", {})

    def noise(*configs):
        loads = [rows.get(c, {}).get("other_cpu_share") for c in configs]
        loads = [x for x in loads if x is not None]
        if loads and max(loads) > 0.10:
            return (f"unreliable: other processes used up to "
                    f"{max(loads):.0%} of the CPUs")
        return ""

    def add(name, value, limit, ok, fmt, note=""):
        if value is None or limit is None:
            out.append((name, "n/a", "n/a", "n/a", note))
        else:
            out.append((name, fmt(value), fmt(limit),
                        "PASS" if ok(value, limit) else "MISS", note))

    sec = lambda v: f"{v:.3f} s"  # noqa: E731
    stall = a.get("stall_per_save_s")
    sync_stall = s.get("stall_per_save_s")
    add("async stall/save <= 0.1 x sync save (fit delta)", stall,
        0.1 * sync_stall if sync_stall is not None and sync_stall > 0
        else None, lambda v, l: v <= l, sec,
        noise("kc_async", "kc_sync") or (
            "" if sync_stall is None or sync_stall > 0 else
            "the sync stall came out <= 0: noise; see in-hook s/save"))
    add("async stall/save <= 2 x in-memory copy", stall,
        2 * copy["copy_s"] if "copy_s" in copy else None,
        lambda v, l: v <= l, sec, noise("kc_async", "none"))
    add("async background write >= 0.8 x raw write+fsync",
        a.get("write_mbps"),
        0.8 * raw["write_mbps"] if "write_mbps" in raw else None,
        lambda v, l: v >= l, lambda v: f"{v:.0f} MB/s",
        noise("kc_async", "none"))
    if size_bytes >= 0.9e9:
        add(f"fit throughput with async saves every "
            f"{ctx['save_interval_s']:.1f} s >= 0.95 x no checkpoints",
            a.get("throughput_vs_none"), 0.95, lambda v, l: v >= l,
            lambda v: f"{v:.3f}x", noise("kc_async"))
    return out


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def _f(value, fmt, missing="-"):
    return missing if value is None else format(value, fmt)


def table(rows, ctx):
    head = ["config", "ckpt MB", "in-hook s/save", "stall s/save (fit Δ)",
            "stall ×sync", "next step +s", "write s", "write MB/s", "×raw",
            "end of fit s", "steps/s ×none", "peak RSS GB (Δ)", "other load"]
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
            _f(r.get("train_end_s"), ".3f"),
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


def render_size(size, spec, raw, saves):
    """Analysis, targets and tables of one size: (text lines, md lines, entry)."""
    rows, ctx = analyse(raw, spec, saves)
    if ctx is None:
        return ([f"[{size}] baseline failed; no table."], [],
                {"spec": spec, "raw": raw})
    tg = targets(rows, ctx, ctx["state_bytes"])
    head, body = table(rows, ctx)
    text = [f"\n## {size}: {describe(size, ctx)}\n",
            render_text(head, body), "", "Targets (keras_ckpt async):"]
    text += [f"  {verdict:4}  {name}: {value} (goal {goal})"
             + (f"  [{note}]" if note else "")
             for name, value, goal, verdict, note in tg]
    md = [f"## {size}", "", describe(size, ctx) + ".", "",
          render_md(head, body), "", "| target (keras_ckpt async) | "
          "measured | goal | | |", "|---|---:|---:|---|---|"]
    md += [f"| {n} | {v} | {g} | {r} | {note} |" for n, v, g, r, note in tg]
    a = rows.get("kc_async", {})
    if a.get("step_during_write_x") is not None:
        line = (
            "keras_ckpt async, where the stall comes from: "
            f"{a['hook_per_save_s']:.3f} s/save in the hooks (of which "
            f"waiting for the previous write {a['wait_in_loop_s'] / saves:.3f}"
            f" s), first step after a snapshot +{a['next_step_excess_s']:.3f} "
            f"s (copy-on-write), steps while the writer runs "
            f"x{a['step_during_write_x']:.2f} the baseline step; the writer "
            f"was busy {a['writer_busy_share']:.0%} of the loop.")
        text.insert(3, line + "\n")
        md += ["", line]
    md.append("")
    return text, md, {"spec": spec, "context": ctx, "rows": rows,
                      "targets": tg, "raw": raw}


def rerender(path):
    """Prints the tables of a saved report again (after changing analysis)."""
    with open(path) as f:
        report = json.load(f)
    md = [f"# keras_ckpt checkpoint benchmark — {report.get('started')}", "",
          f"`{report['command']}`", "", f"Machine: {report['machine']}", ""]
    for size, entry in report["sizes"].items():
        saves = next(iter(entry["raw"].values()))["runs"][0]["saves"]
        text, md_size, _ = render_size(size, entry["spec"], entry["raw"],
                                       saves)
        print("\n".join(text))
        md += md_size
    out = os.path.splitext(path)[0] + ".rerendered.md"
    with open(out, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {out}")
    return 0


# ---------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100MB only, 2 saves, 1 repeat (~1 min)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated total state sizes, e.g. 100MB,1GB "
                        "(default: 100MB,1GB)")
    p.add_argument("--configs", default=",".join(CONFIGS[1:]),
                   help="comma-separated subset of: " + ", ".join(CONFIGS[1:])
                   + " (the baseline always runs)")
    p.add_argument("--saves", type=int, default=3,
                   help="saves inside the training loop (default 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="paired fits per configuration, best taken (default:"
                        " 3 for ~100MB, 2 for ~1GB; 2 and 1 for the non-"
                        "keras_ckpt configurations)")
    p.add_argument("--save-freq", type=int, default=None,
                   help="save every N batches (default: 40 for ~100MB, 8 "
                        "for ~1GB)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--floor-repeats", type=int, default=3)
    p.add_argument("--tmp-dir", default=os.path.join(RESULTS, "tmp"),
                   help="where checkpoints are written (must be on the "
                        "disk to measure, not tmpfs); removed afterwards")
    p.add_argument("--timeout", type=int, default=420,
                   help="seconds per configuration process")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for "
                        "other processes to use < 10%% of the CPUs")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--from-json", metavar="PATH",
                   help="re-render the tables of a saved results JSON; runs "
                        "nothing")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    if args.quick:
        args.sizes = args.sizes or QUICK["sizes"]
        args.saves = QUICK["saves"]
        args.repeats = args.repeats or QUICK["repeats"]
        args.floor_repeats = QUICK["floor_repeats"]
    args.sizes = args.sizes or "100MB,1GB"
    configs = ["none"] + [c.strip() for c in args.configs.split(",")
                          if c.strip() and c.strip() != "none"]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs: {sorted(unknown)}")

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
          f"# writing under {tmp_root}", flush=True)

    report = {"command": command, "machine": machine, "sizes": {},
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    md = [f"# keras_ckpt checkpoint benchmark — {report['started']}", "",
          f"`{command}`", "",
          f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu')}), "
          f"{machine.get('ram_gib')} GiB RAM, disk {machine.get('disk')}.", ""]
    t_all = time.perf_counter()
    try:
        for size_text in args.sizes.split(","):
            size, spec = parse_size(size_text)
            if args.repeats:
                spec["repeats"] = spec["ref_repeats"] = args.repeats
            if args.save_freq:
                spec["save_freq"] = args.save_freq
            raw = {}
            for config in configs:
                if args.wait_idle:
                    w = time.perf_counter()
                    wait_until_idle(args.wait_idle)
                    report["waited_s"] = report.get("waited_s", 0.0) + (
                        time.perf_counter() - w)
                t = time.perf_counter()
                print(f"[{size}] {config} ...", end=" ", flush=True)
                raw[config] = run_worker(config, size, spec, args, tmp_root)
                err = raw[config].get("error")
                other = raw[config].get("other_cpu_share")
                busy = other is not None and other > 0.05
                print(f"{time.perf_counter() - t:.0f} s"
                      + (f"  (other processes used {other:.0%} of the "
                         "CPUs meanwhile: numbers are noisy)" if busy else "")
                      + (f"  ERROR {err}: " + "\n".join(
                          raw[config].get("stderr_tail", [])) if err else ""),
                      flush=True)
            text, md_size, entry = render_size(size, spec, raw, args.saves)
            print("\n".join(text), flush=True)
            md += md_size
            report["sizes"][size] = entry
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        try:
            os.rmdir(args.tmp_dir)  # only if empty
        except OSError:
            pass
    report["total_s"] = time.perf_counter() - t_all
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = []
    for name in (f"bench-{stamp}", "latest"):
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write("\n".join(md) + "\n")
        paths.append(os.path.join(args.out, name))
    waited = report.get("waited_s")
    print(f"\ntotal {report['total_s']:.0f} s"
          + (f" ({waited:.0f} s of it waiting for an idle machine)"
             if waited else "") + "; results: "
          f"{os.path.relpath(paths[0], ROOT)}.{{json,md}} "
          f"(and latest.{{json,md}})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
