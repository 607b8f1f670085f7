"""`train.py`'s job with one fault injected into the commit protocol.

Usage: fault_job.py [--kill STEP] [--at-save K] [--pause-at-save K]
                    [--mirror-options JSON] -- <train.py arguments>

`--kill STEP` ends the process with `os._exit(137)` (as SIGKILL would: no
cleanup, no flush) right after STEP of the K-th save or a later one:

  local-data       the data file is written, the index not yet
  local-index      data and index written, the manifest not yet
  local-manifest   the manifest is committed, the pointer not yet updated
  local-pointer    the pointer is updated, retention not yet applied
  local-retention  retention deleted its first checkpoint
  mirror-data      the data file is uploaded, the index not yet
  mirror-index     data and index uploaded, the manifest not yet
  mirror-manifest  the manifest is uploaded, the mirror's pointer not yet
  mirror-pointer   the mirror's pointer is written, its retention not yet
  mirror-retention the mirror's retention deleted its first checkpoint

`--pause-at-save K` writes `<dir>.paused` once the K-th save is committed
and waits for `<dir>.go` (the test arms a network fault in between).
"""

import functools
import json
import os
import re
import runpy
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KILL_STEPS = (
    "local-data", "local-index", "local-manifest", "local-pointer",
    "local-retention", "mirror-data", "mirror-index", "mirror-manifest",
    "mirror-pointer", "mirror-retention",
)


def main():
    argv = sys.argv[1:]
    split = argv.index("--")
    ours, theirs = argv[:split], argv[split + 1:]
    options = dict(zip(ours[::2], ours[1::2]))
    kill = options.get("--kill")
    at_save = int(options.get("--at-save", "1"))
    pause_at = options.get("--pause-at-save")
    mirror_options = json.loads(options.get("--mirror-options", "{}"))
    directory = os.path.abspath(theirs[theirs.index("--dir") + 1])
    assert kill is None or kill in KILL_STEPS, kill

    import keras_ckpt.store as uploaders
    from keras_ckpt import manager
    from keras_ckpt.engine import commit
    from keras_ckpt.store import base

    if mirror_options:
        uploaders.get_uploader = functools.partial(
            uploaders.get_uploader, **mirror_options)

    saves = [0]
    in_retention = [False]

    def reached(step):
        if step == kill and saves[0] >= at_save:
            sys.stdout.flush()
            os._exit(137)

    def after(fn, decide):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            step = decide(*args, **kwargs)
            if step:
                reached(step)
            return result
        return wrapped

    original_save = commit.Committer.save

    def save(self, *args, **kwargs):
        saves[0] += 1
        result = original_save(self, *args, **kwargs)
        if pause_at is not None and saves[0] == int(pause_at):
            open(directory + ".paused", "w").close()
            while not os.path.exists(directory + ".go"):
                time.sleep(0.05)
        return result

    commit.Committer.save = save

    def fsync_step(path):
        if os.path.dirname(os.path.abspath(path)) != directory:
            return None
        if path.endswith(manager.DATA_SUFFIX):
            if kill == "local-data" and saves[0] >= at_save:
                # The index is written after the data: not there yet.
                os.remove(path[: -len(manager.DATA_SUFFIX)] + ".index")
            return "local-data"
        return "local-index" if path.endswith(".index") else None

    manager._fsync_file = after(manager._fsync_file, fsync_step)

    # The local directory and the mirror are both stores: the same methods
    # write both, told apart by the store's directory.
    def is_local(store):
        return getattr(store, "path", None) == directory

    original_retain = manager.LocalCheckpoints.retain

    def retain(self, *args, **kwargs):
        in_retention[0] = True
        try:
            return original_retain(self, *args, **kwargs)
        finally:
            in_retention[0] = False

    manager.LocalCheckpoints.retain = retain

    def upload_step(self, local_path, name, progress=None):
        if is_local(self):
            return None
        if name.endswith(manager.DATA_SUFFIX):
            return "mirror-data"
        return "mirror-index" if name.endswith(".index") else None

    base.Store.upload_file = after(base.Store.upload_file, upload_step)

    def write_step(self, name, data, if_absent=False):
        where = "local" if is_local(self) else "mirror"
        if re.fullmatch(r"ckpt-\d+\.json", name):
            return f"{where}-manifest"
        return f"{where}-pointer" if name == "checkpoint" else None

    base.Store.write_bytes = after(base.Store.write_bytes, write_step)

    def delete_step(self, *args, **kwargs):
        if is_local(self):
            return "local-retention" if in_retention[0] else None
        return "mirror-retention"

    base.Store.delete_checkpoint = after(base.Store.delete_checkpoint,
                                         delete_step)

    sys.argv = [os.path.join(HERE, "train.py"), *theirs]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
