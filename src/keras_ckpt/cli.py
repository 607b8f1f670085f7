"""`keras-ckpt`: list, inspect, verify, copy, export and prune checkpoints.

Every command takes a local checkpoint directory or a mirror URL
(`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
`file:///path`) and reads and writes it only through its `Store` (a local
directory is a `LocalStore`), so the commit protocol (data, index,
manifest, then the `checkpoint` pointer) is the same as during training.

Exit codes: 0 success, 1 failure (a damaged checkpoint, a missing bucket, a
refused request: one `keras-ckpt: error: ...` line on stderr, the traceback
only with `--debug`), 2 usage error (bad arguments), 130 interrupted.

Example:

```
keras-ckpt ls s3://my-bucket/run-1 --monitor val_loss
keras-ckpt verify gs://my-bucket/run-1
keras-ckpt pull az://container/run-1 ./checkpoints
keras-ckpt export ./checkpoints ./export --checkpoint best --monitor val_loss
keras-ckpt prune s3://my-bucket/run-1 --keep 3 --dry-run
```
"""

import argparse
import contextlib
import dataclasses
import difflib
import datetime
import importlib
import json
import logging
import os
import sys
import tempfile
import textwrap
import threading
import traceback

from keras_ckpt import __version__
from keras_ckpt._format import human_size as _human_size
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import CheckpointNotFoundError
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import ExportExistsError
from keras_ckpt.errors import KerasCkptError

PROG = "keras-ckpt"
_FILE_RE = manifest_lib.FILE_RE


class _UsageError(Exception):
    """Arguments that parse but make no sense together: exit code 2."""


# ---------------------------------------------------------------------------
# Sources: a local directory or a mirror URL, seen the same way.


@dataclasses.dataclass
class _Entry:
    """One checkpoint (a `ckpt-<N>.json` manifest) of a source."""

    name: str
    manifest: object  # manifest_lib.Manifest, or None if invalid
    problems: list
    location: str  # local prefix or URL of the checkpoint

    @property
    def complete(self):
        return self.manifest is not None and not self.problems

    @property
    def step(self):
        return manifest_lib.step_of(self.name)


class _Source:
    """A local directory or a mirror URL, seen the same way: through its
    `Store`."""

    def __init__(self, location):
        from keras_ckpt import sources

        self.remote = sources.is_remote(location)
        self.store = _uploader(location) if self.remote else (
            sources.open_store(location))
        self.location = self.store.url if self.remote else (
            self.store.directory)

    def entries(self):
        """Every checkpoint with a manifest, valid or not, oldest first."""
        if not self.remote and not os.path.isdir(self.location):
            raise CheckpointNotFoundError(
                f"{self.location} does not exist or is not a directory."
            )
        return [
            _Entry(listed.name, listed.manifest, list(listed.problems),
                   self.where(listed.name))
            for listed in self.store.listing()
        ]

    def where(self, name):
        if self.remote:
            return f"{self.location}/{name}"
        return manifest_lib.confined(self.location, name)

    def leftovers(self):
        return _leftover_names(self.store.list_files())

    def checksum_problems(self, entry):
        return self.store.checksum_problems(entry.manifest)


def _uploader(url):
    """`get_uploader(url)`; a malformed URL or unknown scheme is a usage
    error, and a plain path means that directory (`file://`)."""
    from keras_ckpt import sources
    from keras_ckpt.store import get_uploader

    if not sources.is_url(url):
        url = "file://" + os.path.abspath(url)
    try:
        return get_uploader(url)
    except ValueError as e:
        raise _UsageError(str(e)) from None


@contextlib.contextmanager
def _upload_options(args):
    """Applies `--upload-option` to every uploader the command builds, after
    checking the options (and KERAS_CKPT_UPLOAD_OPTIONS) for each URL
    argument, so a typo fails before any transfer."""
    from keras_ckpt import sources
    from keras_ckpt.store import UploaderOptions
    from keras_ckpt.store import options as upload_options_lib

    try:
        given = upload_options_lib.parse_entries(
            args.upload_options, "--upload-option")
    except ValueError as e:
        raise _UsageError(str(e)) from None
    known = upload_options_lib.known_names(UploaderOptions)
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise _UsageError(
                f"Unknown --upload-option `{key}`.{hint} Valid options: "
                f"{', '.join(known)}."
            )
    with upload_options_lib.command_line(given):
        for name in ("url", "source", "out", "ckpt"):
            value = getattr(args, name, None)
            if isinstance(value, str) and sources.is_url(value):
                try:
                    _uploader(value)
                except KerasCkptError:
                    pass  # reported by the command itself, with context
        yield


def _parse(source):
    """`sources.parse_source()`; a mistyped URL is a usage error."""
    from keras_ckpt import sources

    try:
        return sources.parse_source(source)
    except ValueError as e:
        raise _UsageError(str(e)) from None


def _open_source(source):
    """Returns `(source, name)`: `name` is the checkpoint `source` names
    (`dir/ckpt-120`, `s3://b/p/ckpt-120`), or None for a whole directory."""
    from keras_ckpt import sources

    location, name = _parse(source)
    if name is None and not sources.is_remote(location) and not (
            os.path.isdir(location)):
        sources.local_source(location)  # raises, naming what is missing
    return _Source(location), name


def _leftover_names(filenames):
    """Checkpoints with files but no manifest: unfinished saves or uploads."""
    with_files = {
        match.group(1)
        for match in map(_FILE_RE.match, filenames)
        if match and not match.string.endswith(".json")
    }
    committed = set(manifest_lib.names_from_listing(filenames))
    return sorted(with_files - committed, key=manifest_lib.step_of)


def _complete(entries):
    return [e for e in entries if e.complete]


def _retention(monitor=None, mode="auto", **kwargs):
    from keras_ckpt.manager import RetentionPolicy
    from keras_ckpt.manager import resolve_mode

    return RetentionPolicy(monitor=monitor, mode=resolve_mode(monitor, mode),
                           **kwargs)


# ---------------------------------------------------------------------------
# Formatting.


def _local_time(timestamp, sep="T"):
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(
        sep=sep, timespec="seconds"
    )


def _format_metrics(metrics):
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, (int, float)) else
        f"{key}={value}"
        for key, value in sorted(metrics.items())
    )


def _table(header, rows, indent=""):
    """Aligned columns; `header` may be None."""
    all_rows = ([header] if header else []) + list(rows)
    if not all_rows:
        return ""
    widths = [
        max(len(str(row[i])) for row in all_rows)
        for i in range(len(all_rows[0]))
    ]
    lines = []
    for row in all_rows:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _out(text=""):
    # Looked up at each call so that redirected / captured stdout works.
    print(text, file=sys.stdout)


def _err(text):
    print(text, file=sys.stderr)


def _one_line(error):
    text = " ".join(
        line.strip() for line in str(error).splitlines() if line.strip()
    )
    return text or type(error).__name__


# ---------------------------------------------------------------------------
# Progress bars.


class _Progress:
    """A thread-safe byte counter, drawn as a tqdm bar when enabled.

    It is the `progress(n_bytes)` callback of `Uploader.push` / `pull`
    (S3 calls it from its transfer threads).
    """

    def __init__(self, total, desc, enabled):
        self.bytes = 0
        self._lock = threading.Lock()
        self._bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            # tqdm is a dependency; a stripped-down install still copies,
            # with the command's summary line as its only progress report.
            return
        self._bar = tqdm(
            total=total, desc=desc, unit="B", unit_scale=True,
            unit_divisor=1024, file=sys.stderr, dynamic_ncols=True,
            mininterval=0.2,
        )

    def __call__(self, n_bytes):
        with self._lock:
            self.bytes += n_bytes
            if self._bar is not None:
                self._bar.update(n_bytes)

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Commands.


def _cmd_ls(args):
    source, name = _open_source(args.source)
    entries = source.entries()
    if name is not None:
        entries = [e for e in entries if e.name == name]
    complete = _complete(entries)
    latest = complete[-1].name if complete else None
    best = None
    if args.monitor:
        ranked = _retention(args.monitor, args.mode).best(
            [e.manifest for e in complete]
        )
        best = ranked[0].name if ranked else None
        if best is None and complete:
            _err(f"{PROG}: warning: no complete checkpoint in "
                 f"{source.location} logged {args.monitor!r}; none is "
                 "marked best.")
    rows = []
    for entry in entries:
        m = entry.manifest
        marks = [mark for mark, which in (("latest", latest), ("best", best))
                 if entry.name == which]
        rows.append({
            "name": entry.name,
            "step": entry.step,
            "epoch": m.epoch if m else None,
            "batch": m.batch if m else None,
            "timestamp": m.timestamp if m else None,
            "time": (datetime.datetime.fromtimestamp(m.timestamp).astimezone()
                     .isoformat(timespec="seconds") if m else None),
            "size": m.total_bytes if m else None,
            "metrics": dict(m.metrics) if m else {},
            "complete": entry.complete,
            "valid": m is not None,
            "problems": entry.problems,
            "latest": "latest" in marks,
            "best": "best" in marks,
            "location": entry.location,
        })
    if args.json:
        _out(json.dumps(rows, indent=1))
        return 0
    if not rows:
        _out(f"No checkpoints in {source.location}.")
        return 0
    header = ["NAME", "STEP", "EPOCH", "BATCH", "TIME", "SIZE", "STATUS",
              "MARKS", "METRICS"]
    _out(_table(header, [
        [
            row["name"], row["step"], _dash(row["epoch"]),
            _dash(row["batch"]), _local_time(row["timestamp"]),
            "-" if row["size"] is None else _human_size(row["size"]),
            "complete" if row["complete"] else (
                "INCOMPLETE" if row["valid"] else "INVALID"),
            ",".join(m for m in ("latest", "best") if row[m]) or "-",
            _format_metrics(row["metrics"]) or "-",
        ]
        for row in rows
    ]))
    for row in rows:
        if row["problems"]:
            _out(f"{row['name']}: " + "; ".join(row["problems"]))
    return 0


def _dash(value):
    return "-" if value is None else value


def _select(source, name, which="latest", monitor=None, mode="auto",
            complete_only=True):
    """The entry `name` names, else `which` ("latest", "best", a step)."""
    from keras_ckpt import sources

    entries = source.entries()
    if name is not None:
        for entry in entries:
            if entry.name == name and (entry.complete or not complete_only):
                return entry
        state = "complete " if complete_only else ""
        raise CheckpointNotFoundError(
            f"No {state}checkpoint {name} in {source.location}; complete "
            "ones: " + (", ".join(e.name for e in _complete(entries))
                        or "none") + "."
        )
    complete = _complete(entries)
    manifest = sources.pick(
        [e.manifest for e in complete], which, _retention(monitor, mode),
        source.location,
    )
    return next(e for e in complete if e.name == manifest.name)


def _cmd_inspect(args):
    _import_modules(args.imports)
    source, name = _open_source(args.ckpt)
    entry = _select(source, name, complete_only=False)
    m = entry.manifest
    if m is None:
        raise CorruptCheckpointError(
            f"Checkpoint {entry.location} is damaged: "
            + "; ".join(entry.problems)
        )
    if args.json:
        _out(json.dumps({
            "name": entry.name,
            "location": entry.location,
            "complete": entry.complete,
            "problems": entry.problems,
            "manifest": dataclasses.asdict(m),
        }, indent=1, default=str))
        return 0
    status = "complete" if entry.complete else "INCOMPLETE: " + "; ".join(
        entry.problems)
    metadata = m.metadata or {}
    versions = metadata.get("versions") or {}
    _out(f"Checkpoint  {entry.location}  ({status})")
    _out(f"Position    step {m.step}, epoch {m.epoch}, batch {m.batch}")
    _out(f"Saved       {_local_time(m.timestamp, sep=' ')} (local time)")
    _out(f"Metrics     {_format_metrics(m.metrics) or '-'}")
    _out(f"Size        {_human_size(m.total_bytes)} in {len(m.files)} files")
    _out(_table(None, [
        [filename, _human_size(spec["size"]),
         f"{manifest_lib.CHECKSUM} "
         f"{str(spec.get(manifest_lib.CHECKSUM, spec.get('sha256', '')))[:16]}"]
        for filename, spec in sorted(m.files.items())
    ], indent="  "))
    _out("Versions    " + (", ".join(f"{k} {v}" for k, v in
                                     sorted(versions.items())) or "-"))
    _out(f"Model       {metadata.get('model_class', '-')}"
         + ("" if metadata.get("model_config") else
            " (no config stored: `keras-ckpt export` cannot rebuild it)"))
    _out("State       " + (", ".join(sorted(m.state)) or "-"))
    epochs = (m.history or {}).get("epochs") or []
    _out(f"History     {len(epochs)} epoch(s) of logs"
         + (f": {', '.join(sorted((m.history.get('logs') or {})))}"
            if epochs else ""))
    _out("Variables")
    for group, specs in m.variables.items():
        params = sum(_count(shape) for _, shape, *_ in specs)
        _out(f"  {group}: {len(specs)} variable(s), {params:,} value(s)")
        rows = [[path, str(tuple(shape)), dtype]
                for path, shape, dtype, *_ in specs]
        if rows:
            _out(_table(None, rows, indent="    "))
    if metadata.get("model_config"):
        _out("Model summary")
        try:
            from keras_ckpt.loading import rebuild_model

            model = rebuild_model(m, entry.location, compile=False)
            model.summary(print_fn=lambda text, **_: _out(text.rstrip("\n")))
        except KerasCkptError as e:
            _out(f"  (unavailable: {_one_line(e)})")
    return 0


def _count(shape):
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _cmd_verify(args):
    source, name = _open_source(args.source)
    entries = source.entries()
    if name is not None:
        entries = [e for e in entries if e.name == name]
    if not entries:
        raise CheckpointNotFoundError(
            f"No checkpoint {name + ' ' if name else ''}in {source.location} "
            "to verify."
        )
    results = []
    for entry in entries:
        problems = list(entry.problems)
        if entry.manifest is not None and not problems:
            problems = source.checksum_problems(entry)
        results.append({"name": entry.name, "location": entry.location,
                        "ok": not problems, "problems": problems})
    leftovers = [] if name else source.leftovers()
    broken = [r for r in results if not r["ok"]]
    if args.json:
        _out(json.dumps({"source": source.location, "checkpoints": results,
                         "unfinished": leftovers}, indent=1))
    else:
        for r in results:
            if r["ok"]:
                _out(f"OK      {r['name']}")
            else:
                _out(f"BROKEN  {r['name']}: " + "; ".join(r["problems"]))
        for leftover in leftovers:
            _out(f"note: {leftover} has files but no manifest (an unfinished "
                 "save or upload); it is not a checkpoint.")
        _out(f"{len(results) - len(broken)} OK, {len(broken)} broken in "
             f"{source.location}.")
    if broken:
        _err(f"{PROG}: error: {len(broken)} broken checkpoint(s) in "
             f"{source.location}: {', '.join(r['name'] for r in broken)}.")
        return 1
    return 0


def _cmd_pull(args):
    from keras_ckpt import sources

    if sources.is_url(args.dir):
        raise _UsageError(
            f"DIR must be a local directory, not {args.dir!r}. To copy "
            "between stores, pull to a directory, then push it."
        )
    base, name = _parse(args.source)
    uploader = _uploader(base)
    directory = os.path.abspath(args.dir)
    # What `pull()` copies, chosen here so that the progress bar's total
    # covers exactly the bytes the local directory lacks.
    chosen = uploader.pull_choice(None if name is None else [name])
    pending = 0
    for manifest in chosen:
        for filename, spec in manifest.files.items():
            path = manifest_lib.confined(directory, filename)
            if not (os.path.isfile(path)
                    and os.path.getsize(path) == int(spec["size"])):
                pending += int(spec["size"])
    names = [m.name for m in chosen]
    with _Progress(pending, "pull", args.progress) as progress:
        pulled = uploader.pull(directory, names=names, verify=True,
                               progress=progress)
    _out(f"Pulled {len(pulled)} checkpoint(s) ({_span(pulled)}) from "
         f"{uploader.url} to {directory}: "
         f"{_human_size(progress.bytes)} transferred.")
    return 0


def _cmd_push(args):
    from keras_ckpt import sources

    if sources.is_url(args.dir):
        raise _UsageError(
            f"DIR must be a local directory, not {args.dir!r}."
        )
    directory = os.path.abspath(args.dir)
    uploader = _uploader(args.url)
    # What `push()` will send: every file of each local checkpoint that is
    # not already mirrored with the same manifest and sizes.
    local = _Source(directory) if os.path.isdir(directory) else None
    pending = 0
    if local is not None:
        listing = uploader.list_files()
        for entry in _complete(local.entries()):
            manifest_file = manifest_lib.manifest_name(entry.name)
            mirrored = (
                manifest_file in listing
                and not manifest_lib.size_problems(entry.manifest, listing)
                and local.store.read_bytes(manifest_file)
                == uploader.read_bytes(manifest_file)
            )
            if not mirrored:
                pending += entry.manifest.total_bytes
    with _Progress(pending, "push", args.progress) as progress:
        pushed = uploader.push(directory, progress=progress)
    _out(f"Pushed {len(pushed)} checkpoint(s) ({_span(pushed)}) from "
         f"{directory} to {uploader.url}: "
         f"{_human_size(progress.bytes)} transferred.")
    return 0


def _span(names):
    if not names:
        return "none"
    if len(names) == 1:
        return names[0]
    return f"{names[0]} ... {names[-1]}"


def _cmd_export(args):
    from keras_ckpt.export import export_saved_model
    from keras_ckpt.loading import load

    if args.layout == "vertex" and args.version is not None:
        raise _UsageError(
            "--version cannot be used with --layout vertex (Vertex AI loads "
            "saved_model.pb from the root of OUT, without a version dir)."
        )
    if args.checkpoint == "best" and not args.monitor:
        raise _UsageError("--checkpoint best needs --monitor METRIC.")
    source, name = _open_source(args.source)
    if name is not None and args.checkpoint is not None:
        raise _UsageError(
            f"SOURCE already names checkpoint {name}; drop --checkpoint or "
            "give the checkpoint directory as SOURCE."
        )
    _import_modules(args.imports)
    try:
        # The read path of restore() and load_model(): verified, and for
        # "latest"/"best" a damaged checkpoint falls back to the previous.
        model, found = load(args.source, args.checkpoint or "latest",
                            _retention(args.monitor, args.mode),
                            compile=False)
    except KerasCkptError as e:
        if "custom_objects" not in str(e):
            raise
        raise KerasCkptError(
            f"{e} On the command line: --import MODULE for the module that "
            "registers them."
        ) from None
    info = found.manifest
    try:
        path = export_saved_model(model, args.out, layout=args.layout,
                                  version=args.version,
                                  overwrite=args.overwrite)
    except ExportExistsError as e:
        raise ExportExistsError(
            f"{e} On the command line: --overwrite."
        ) from None
    _out(f"Exported {info.name} (step {info.step}, epoch {info.epoch}, "
         f"batch {info.batch}) of {source.location} to {path}.")
    return 0


def _import_modules(modules):
    if not modules:
        return
    # Like `python -m`: modules next to where the command runs are found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise KerasCkptError(
                f"Cannot import {module!r} (given with --import): {e}. Make "
                "it importable (PYTHONPATH or the current directory)."
            ) from e


def _cmd_prune(args):
    if args.keep_best is not None and not args.monitor:
        raise _UsageError("--keep-best needs --monitor METRIC.")
    policy = _retention(
        args.monitor, args.mode, max_to_keep=args.keep,
        keep_every_n_hours=args.keep_every_n_hours,
        keep_best=1 if args.keep_best is None else args.keep_best,
    )
    source, name = _open_source(args.source)
    if name is not None:
        raise _UsageError(
            f"SOURCE must be a checkpoint directory or mirror URL, not the "
            f"checkpoint {name}."
        )
    entries = source.entries()
    complete = _complete(entries)
    if not complete:
        raise CheckpointNotFoundError(
            f"No complete checkpoint in {source.location}; nothing to prune."
        )
    keep = policy.select([e.manifest for e in complete])
    kept = [e for e in complete if e.name in keep]
    dropped = [e for e in complete if e.name not in keep]
    verb = "would delete" if args.dry_run else "deleted"
    if not args.dry_run and dropped:
        # Pointer first, then each dropped checkpoint's manifest before
        # its data; a save or upload still in flight (files newer than the
        # latest, no manifest yet) is spared.
        source.store.retain([e.name for e in kept],
                            [e.manifest.timestamp for e in kept],
                            drop_damaged=False)
    rows = []
    for entry in complete:
        action = verb if entry.name not in keep else "keep"
        if entry is complete[-1]:
            action = "keep (latest)"
        rows.append([action, entry.name, _describe(entry)])
    rows += [["skip (incomplete)", e.name, "; ".join(e.problems)]
             for e in entries if not e.complete]
    _out(_table(None, rows))
    _out(f"{verb.capitalize()} {len(dropped)} of {len(complete)} complete "
         f"checkpoint(s) in {source.location}"
         + (" (dry run: nothing was deleted)." if args.dry_run else "."))
    return 0


def _describe(entry):
    m = entry.manifest
    text = f"step {m.step}, {_human_size(m.total_bytes)}"
    metrics = _format_metrics(m.metrics)
    return f"{text}, {metrics}" if metrics else text


# ---------------------------------------------------------------------------
# Argument parsing.


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive int, got {text!r}"
        )
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative int, got {text!r}"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        )
    return value


def _which_checkpoint(text):
    if text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    if manifest_lib.step_of(text) is not None:
        return text
    raise argparse.ArgumentTypeError(
        f"expected latest, best, a step or ckpt-<step>, got {text!r}"
    )


_SOURCE_HELP = (
    "a local checkpoint directory or a mirror URL: s3://bucket/prefix, "
    "gs://bucket/prefix, az://container/prefix or file:///path"
)


def _add_monitor(parser, what):
    parser.add_argument(
        "--monitor", metavar="METRIC",
        help=f"logged metric that ranks checkpoints ({what}), e.g. val_loss",
    )
    parser.add_argument(
        "--mode", choices=("auto", "min", "max"), default="auto",
        help="whether a lower (min) or higher (max) METRIC is better; auto: "
             "max for accuracy-like metrics, else min (default: auto)",
    )


def _add_progress(parser):
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar with bytes and rate on stderr (default: "
             "when stderr is a terminal)",
    )


def _build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="print the full traceback on errors",
    )
    common.add_argument(
        "--upload-option", action="append", default=[], metavar="KEY=VALUE",
        dest="upload_options",
        help="an option of the store, applied to every object written (and "
             "to every request, for ExpectedBucketOwner, RequestPayer, "
             "user_project), e.g. ServerSideEncryption=aws:kms, "
             "kms_key_name=projects/..., encryption_scope=NAME, "
             "Tagging.team=ml; repeatable; overrides "
             "KERAS_CKPT_UPLOAD_OPTIONS",
    )
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=formatter,
        description=(
            "List, inspect, verify, copy, export and prune keras_ckpt\n"
            "checkpoints, in a local directory or on S3, GCS, Azure Blob or\n"
            "file:// mirrors."
        ),
        epilog=(
            "exit codes: 0 success, 1 failure, 2 usage error, 130 "
            "interrupted.\nRun `keras-ckpt COMMAND --help` for a command's "
            "options."
        ),
    )
    parser.add_argument("--debug", action="store_true", default=False,
                        help="print the full traceback on errors")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     required=True)

    def command(name, summary, description, examples):
        sub = commands.add_parser(
            name, help=summary, parents=[common], formatter_class=formatter,
            description=f"{summary}\n\n{textwrap.fill(description, 79)}",
            epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        )
        sub.set_defaults(parser=sub)
        return sub

    ls = command(
        "ls", "List the checkpoints of a directory or mirror.",
        "One line per checkpoint: step, epoch, batch within the epoch, save "
        "time, size, metrics, whether it is complete, and which one is the "
        "latest (and the best, with --monitor).",
        ["keras-ckpt ls ./checkpoints",
         "keras-ckpt ls s3://my-bucket/run-1 --monitor val_loss",
         "keras-ckpt ls gs://my-bucket/run-1 --json | jq '.[].step'"],
    )
    ls.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    _add_monitor(ls, "marks the best one")
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list instead of a table")
    ls.set_defaults(run=_cmd_ls)

    inspect = command(
        "inspect", "Show what one checkpoint holds.",
        "CKPT is a checkpoint (DIR/ckpt-120, s3://bucket/run/ckpt-120) or a "
        "directory or mirror URL (its latest complete checkpoint). Prints "
        "the training position, save time, metrics, files with sizes, "
        "versions, callback state keys, the variables of each group with "
        "shapes and dtypes, and the model summary when its config is "
        "stored.",
        ["keras-ckpt inspect ./checkpoints",
         "keras-ckpt inspect az://container/run-1/ckpt-120 --json"],
    )
    inspect.add_argument("ckpt", metavar="CKPT",
                         help="a checkpoint path or URL, or a directory/URL "
                              "(its latest checkpoint)")
    inspect.add_argument("--json", action="store_true",
                         help="print the manifest as JSON")
    inspect.add_argument(
        "--import", dest="imports", action="append", metavar="MODULE",
        help="import MODULE first (registers custom layers for the model "
             "summary); repeatable",
    )
    inspect.set_defaults(run=_cmd_inspect)

    verify = command(
        "verify", "Check every file of every checkpoint against its manifest.",
        "Sizes and CRC32C checksums; remote files are downloaded one at a "
        "time to a temporary directory and hashed. Prints OK or BROKEN (with "
        "the reasons) per checkpoint and exits with 1 if any is broken.",
        ["keras-ckpt verify ./checkpoints",
         "keras-ckpt verify gs://my-bucket/run-1",
         "keras-ckpt verify s3://my-bucket/run-1/ckpt-120"],
    )
    verify.add_argument("source", metavar="SOURCE",
                        help=_SOURCE_HELP + ", or one checkpoint of it")
    verify.add_argument("--json", action="store_true",
                        help="print the results as JSON")
    verify.set_defaults(run=_cmd_verify)

    pull = command(
        "pull", "Download checkpoints from a mirror into a local directory.",
        "Every complete checkpoint (or the one SOURCE names) is downloaded "
        "oldest first and verified, then the local `checkpoint` pointer is "
        "written. Files already there with the right size and checksum are "
        "not downloaded again, so an interrupted pull resumes when run "
        "again.",
        ["keras-ckpt pull s3://my-bucket/run-1 ./checkpoints",
         "keras-ckpt pull gs://my-bucket/run-1/ckpt-120 ./branch"],
    )
    pull.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    pull.add_argument("dir", metavar="DIR",
                      help="local directory (created if needed)")
    _add_progress(pull)
    pull.set_defaults(run=_cmd_pull)

    push = command(
        "push", "Upload a local checkpoint directory to a mirror.",
        "Every complete local checkpoint is uploaded oldest first with the "
        "commit protocol (data, index, manifest), then the remote "
        "`checkpoint` pointer is written. Checkpoints already mirrored with "
        "the same manifest are skipped, so an interrupted push resumes when "
        "run again. Remote checkpoints are never deleted (see prune).",
        ["keras-ckpt push ./checkpoints s3://my-bucket/run-1",
         "keras-ckpt push /opt/ml/checkpoints gs://my-bucket/run-1"],
    )
    push.add_argument("dir", metavar="DIR", help="local checkpoint directory")
    push.add_argument("url", metavar="URL",
                      help="mirror URL (s3://, gs://, az://, file://)")
    _add_progress(push)
    push.set_defaults(run=_cmd_push)

    export = command(
        "export", "Export a checkpoint as a SavedModel for serving.",
        "Rebuilds the model from the config stored in the checkpoint (no "
        "training script needed), restores its weights and writes a "
        "SavedModel with `serve` and `serving_default` signatures in the "
        "layout the serving platform loads. Models with custom classes need "
        "--import for the module that registers them.",
        ["keras-ckpt export ./checkpoints ./export",
         "keras-ckpt export s3://b/run-1 s3://b/models/run-1 --layout "
         "sagemaker --version 3",
         "keras-ckpt export gs://b/run-1 gs://b/model --layout vertex "
         "--checkpoint best --monitor val_loss --import my_layers"],
    )
    export.add_argument("source", metavar="SOURCE",
                        help=_SOURCE_HELP + ", or one checkpoint of it")
    export.add_argument("out", metavar="OUT",
                        help="export root: a local directory or a URL")
    export.add_argument(
        "--checkpoint", type=_which_checkpoint, default=None,
        metavar="latest|best|STEP",
        help="which checkpoint: latest, best (needs --monitor), a step or "
             "ckpt-<step> (default: latest)",
    )
    _add_monitor(export, "for --checkpoint best")
    export.add_argument(
        "--layout", choices=("plain", "sagemaker", "vertex"), default="plain",
        help="plain and sagemaker: OUT/<version>/saved_model.pb; vertex: "
             "OUT/saved_model.pb (default: plain)",
    )
    export.add_argument("--version", type=_non_negative_int, default=None,
                        metavar="N",
                        help="numeric version dir for plain and sagemaker "
                             "(default: 1)")
    export.add_argument(
        "--import", dest="imports", action="append", metavar="MODULE",
        help="import MODULE first, so custom objects registered with "
             "keras.saving.register_keras_serializable are found; repeatable",
    )
    export.add_argument("--overwrite", action="store_true",
                        help="replace a model already at the destination")
    export.set_defaults(run=_cmd_export)

    prune = command(
        "prune", "Delete old checkpoints by a retention policy.",
        "Keeps the newest N complete checkpoints, plus the best K by a "
        "metric, plus one every H hours; deletes the other complete ones "
        "(manifest first). Never deletes the latest. Incomplete checkpoints "
        "are reported and left alone.",
        ["keras-ckpt prune ./checkpoints --keep 3 --dry-run",
         "keras-ckpt prune s3://my-bucket/run-1 --keep 2 --keep-best 1 "
         "--monitor val_loss"],
    )
    prune.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    prune.add_argument("--keep", type=_positive_int, required=True,
                       metavar="N", help="keep the newest N checkpoints")
    prune.add_argument("--keep-best", type=_positive_int, default=None,
                       metavar="K",
                       help="also keep the best K by --monitor (default: 1 "
                            "when --monitor is given)")
    _add_monitor(prune, "for --keep-best")
    prune.add_argument("--keep-every-n-hours", type=_positive_float,
                       default=None, metavar="H",
                       help="also keep one checkpoint in every H hours")
    prune.add_argument("--dry-run", action="store_true",
                       help="print what would be deleted; delete nothing")
    prune.set_defaults(run=_cmd_prune)
    return parser


def main(argv=None):
    """Runs `keras-ckpt` with `argv` (default: `sys.argv[1:]`).

    Args:
        argv: list of str or None, the arguments after the program name.

    Returns:
        int, the exit code: 0 success, 1 failure, 2 usage error, 130
        interrupted.

    Example:

    ```python
    from keras_ckpt import cli
    exit_code = cli.main(["verify", "s3://my-bucket/run-1"])
    ```
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else 2
    try:
        with _upload_options(args):
            return args.run(args)
    except _UsageError as e:
        args.parser.print_usage(sys.stderr)
        _err(f"{args.parser.prog}: error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted. Run the same command again to resume.")
        return 130
    except (KerasCkptError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        _err(f"{PROG}: error: {_one_line(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
