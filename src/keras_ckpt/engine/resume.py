"""The resume path: which checkpoint a `fit` continues from, and its restore.

`Checkpoint.on_train_begin` calls `choose_checkpoint` then `Resume.restore`;
the `Resume` it keeps is everything the rest of the `fit` needs to know
about the resume. In order:

1. **Choose the checkpoint** (`find_checkpoint`). `resume=False` starts
   afresh (and refuses a directory that already holds checkpoints).
   `True`/`"latest"`/`"best"` take the newest (best) local checkpoint whose
   sizes and checksums pass, skipping a damaged one with one warning in
   favour of the previous valid one; the mirror's is taken instead when it is
   newer (better), downloaded and verified the same way. A path or URL
   branches from that checkpoint (or from the latest one of that directory).
2. **Agree on it** (`choose_checkpoint`). Under `MultiWorkerMirroredStrategy`
   the chief chooses (uploading its pick first if the mirror lacks it) and
   publishes it through the coordination service (`Cluster.set_key`); every
   other worker restores that very checkpoint, from `directory` if it reads
   the same one there, else from the mirror into a private temporary
   directory deleted as soon as its tensors are read (`_ReadOnceStore`).
3. **Check and build** (`Resume.restore`). A branch that leaves newer
   checkpoints behind is said. A model `fit` has not built yet (a subclassed
   model never called, a `Sequential` without `Input`) is built from the
   shapes of the input, as `fit`'s first trace would; optimizers are built so
   that their slots exist before the restore. The checkpoint must then match
   the model's variables.
4. **Restore**: the model's and optimizers' variables, the RNG states, the
   `state=` objects (callbacks once their own `on_train_begin` has run), the
   epoch `fit` starts at, the data position and the history.
5. **Continue the interrupted epoch** (the rest of `Resume`). The batches of
   the resumed epoch trained before the restart are drawn from the input
   without training (`epoch_batches` under Keras 3, `install_skip` under
   tf_keras) and hidden from every callback (`hides`); the epoch's running
   metrics are restored once the compiled metrics exist (`restore_metrics`).

Where the resume cannot be exact (an input whose order cannot be
reproduced, another number of replicas), `warn_inexact` says so once, at the
start of `fit`.
"""

import json
import os
import shutil
import warnings

from keras_ckpt import _keras_compat as compat
from keras_ckpt import distribute
from keras_ckpt import manager as manager_lib
from keras_ckpt import manifest as manifest_lib
from keras_ckpt import sources
from keras_ckpt.engine import state as state_lib
from keras_ckpt.errors import CheckpointNotFoundError
from keras_ckpt.errors import CorruptCheckpointError


Found = sources.Found


# ---------------------------------------------------------------------------
# 1. Choose the checkpoint.
# ---------------------------------------------------------------------------


def find_checkpoint(resume, store, uploader, retention, download_dir=None):
    """The `Found` checkpoint to resume, or None to start afresh.

    Downloads go to `store` unless `download_dir` is given (a worker that is
    not the chief must not write to the checkpoint directory). What is
    resumed is verified (sizes and checksums): a damaged newest (or best)
    checkpoint is skipped with one warning naming it, in favour of the
    previous valid one.

    Raises:
        ValueError: `resume=False` but `store` holds checkpoints.
        CorruptCheckpointError: every checkpoint is damaged.
    """
    if resume is False:
        existing = store.manifests()
        if existing:
            raise ValueError(
                f"Invalid value for argument `resume`: resume=False, but "
                f"{store.directory} already holds checkpoints (latest "
                f"{existing[-1].name}); a fresh run would mix with them. "
                "Delete them, choose another `directory`, or resume."
            )
        return None
    if resume in (True, "latest", "best"):
        return _newest(
            "best" if resume == "best" else "latest", store, uploader,
            retention, download_dir)
    return _branch_point(resume, store, retention, download_dir)


def _newest(which, store, uploader, retention, download_dir):
    """The newest (best) intact checkpoint, local or mirrored."""
    local = store.manifests()
    damaged = {}
    chosen = sources.pick_verified(store, local, which, retention,
                                   store.directory, damaged) if local else None
    found = None if chosen is None else Found(chosen, store, store.directory)
    if uploader is not None:
        remote = [listed.manifest for listed in uploader.listing()
                  if listed.complete]
        intact = {m.name for m in local} - set(damaged)
        while remote:
            best_remote = sources.pick(remote, which, retention, uploader.url)
            if best_remote.name in intact or (
                chosen is not None
                and not _better(best_remote, chosen, which, retention)
            ):
                break
            try:
                manifest, fetched = sources.fetch_remote(
                    uploader, best_remote.name, download_dir or store.directory
                )
            except CorruptCheckpointError as e:
                sources.warn_corrupt(f"{uploader.url}/{best_remote.name}", e)
                remote.remove(best_remote)
                continue
            found = Found(manifest, fetched, f"{uploader.url}/{manifest.name}")
            break
    if found is None and damaged:
        # Starting over would mix a new run with the damaged one.
        raise CorruptCheckpointError(
            f"Every checkpoint in {store.directory} is damaged, nothing "
            "to resume from: "
            + "; ".join(f"{n}: {r}" for n, r in damaged.items())
            + ". Delete them (`keras-ckpt verify` lists them) or choose "
            "another `directory`."
        )
    return found


def _better(candidate, current, which, retention):
    if which == "latest":
        # Checkpoint numbers follow commit order, also across a branch
        # (whose checkpoints are numbered after those it left behind).
        return (manifest_lib.step_of(candidate.name)
                > manifest_lib.step_of(current.name))
    ranked = retention.best([candidate, current])
    return bool(ranked) and ranked[0] is candidate


def _branch_point(resume, store, retention, download_dir):
    """The checkpoint a path or URL names, to branch from."""
    cache = download_dir or os.path.join(store.directory, ".branch-cache")
    return sources.open_checkpoint(resume, "latest", retention,
                                   download_dir=cache)


# ---------------------------------------------------------------------------
# 2. Agree on it across workers.
# ---------------------------------------------------------------------------


def choose_checkpoint(cluster, resume, store, uploader, retention):
    """The `Found` checkpoint every worker of `cluster` restores, or None.

    The chief (or a single process) picks as `find_checkpoint` does; under a
    coordinated cluster it publishes its pick and the other workers read
    that very checkpoint. A worker that is not the chief never writes to
    `store` (the checkpoint directory): what it downloads goes to a private
    temporary directory, deleted once read.
    """
    if cluster.is_chief:
        if not cluster.coordinated:
            return find_checkpoint(resume, store, uploader, retention)
        try:
            found = find_checkpoint(resume, store, uploader, retention)
            if found is not None and not _is_branch(resume):
                _ensure_mirrored(found, store, uploader, retention)
        except Exception as e:
            cluster.set_key("resume", json.dumps({"error": str(e)}))
            raise
        cluster.set_key("resume", json.dumps(_describe_pick(found, resume)))
        return found
    if not cluster.coordinated:
        # A non-chief task outside MultiWorkerMirroredStrategy trains on
        # its own: it resumes as the chief would, without writing.
        return _disposable(cluster, find_checkpoint(
            resume, store, uploader, retention,
            download_dir=cluster.temp_dir()))
    value = cluster.get_key("resume", distribute.AGREEMENT_TIMEOUT_SECONDS)
    if value is None:
        raise TimeoutError(
            f"keras_ckpt: worker {cluster.task.name} waited "
            f"{distribute.AGREEMENT_TIMEOUT_SECONDS:.0f} s for the chief to "
            "choose the checkpoint to resume from.")
    pick = json.loads(value)
    if "error" in pick:
        raise CheckpointNotFoundError(
            f"Worker {cluster.task.name} cannot resume: the chief failed to "
            f"choose a checkpoint: {pick['error']}")
    return _find_chiefs_pick(cluster, pick, store, uploader, retention)


def _ensure_mirrored(found, store, uploader, retention):
    """Uploads the chief's local pick if the mirror lacks it.

    Workers on other machines read the mirror; a checkpoint committed
    locally whose upload the previous crash cut short is completed first.
    """
    if uploader is None or found.store.directory != store.directory:
        return
    complete = {i.name for i in uploader.list_checkpoints() if i.complete}
    if found.manifest.name in complete:
        return
    manifests = store.manifests()
    keep = retention.select(manifests) | {found.manifest.name}
    kept = [m.name for m in manifests if m.name in keep]
    uploader.mirror(store.directory, found.manifest.name, kept)


def _find_chiefs_pick(cluster, pick, store, uploader, retention):
    name = pick.get("name")
    if name is None:
        return None
    worker = cluster.task.name
    if pick.get("branch"):
        found = find_checkpoint(pick["branch"], store, None, retention,
                                download_dir=cluster.temp_dir())
    else:
        found = None
        manifest = store.get(name)
        if manifest is not None and (
            manifest.timestamp == pick.get("timestamp")  # not a stale one
        ):
            found = Found(manifest, store, store.prefix(name))
        elif uploader is not None:
            manifest, temp_store = sources.fetch_remote(
                uploader, name, cluster.temp_dir(), retention)
            found = Found(manifest, temp_store, f"{uploader.url}/{name}")
        if found is None:
            raise CheckpointNotFoundError(
                f"Worker {worker} cannot read checkpoint {name}, which the "
                f"chief resumes from: it is not (the same) in "
                f"{store.directory} and there is no `mirror`. Put "
                "`directory` on storage every worker reads, or set "
                "`mirror` (every worker reads it)."
            )
    found = _disposable(cluster, found)
    if found.manifest.timestamp != pick.get("timestamp"):
        raise CheckpointNotFoundError(
            f"Worker {worker} found a checkpoint {name} at {found.origin} "
            "that is not the one the chief resumes from (different "
            "timestamp). Give this run its own `directory` and `mirror`."
        )
    return found


def _is_branch(resume):
    return isinstance(resume, (str, os.PathLike)) and resume not in (
        "latest", "best")


def _describe_pick(found, resume):
    if found is None:
        return {"name": None}
    return {
        "name": found.manifest.name,
        "timestamp": found.manifest.timestamp,
        "branch": found.origin if _is_branch(resume) else None,
    }


def _disposable(cluster, found):
    """Deletes a temporary download as soon as its tensors are read."""
    if found is None:
        return None
    temp = cluster.temp_root(found.store.directory)
    if temp is None:
        return found
    return found._replace(store=_ReadOnceStore(found.store.directory, temp))


class _ReadOnceStore(manager_lib.LocalCheckpoints):
    """A downloaded copy that deletes itself once its tensors are read, so
    that even a worker killed later leaves no temporary files behind."""

    def __init__(self, directory, temp_root):
        super().__init__(directory)
        self._temp_root = temp_root

    def read_arrays(self, manifest, verify=False):
        try:
            return super().read_arrays(manifest, verify=verify)
        finally:
            shutil.rmtree(self._temp_root, ignore_errors=True)


# ---------------------------------------------------------------------------
# 3-5. Check, build, restore, and continue the interrupted epoch.
# ---------------------------------------------------------------------------


class Resume:
    """What a resume restored, and what it still has to do in this `fit`.

    Empty (`found` None) for a fresh start. `Checkpoint` keeps one per `fit`
    and asks it, at each hook, whether a batch is one of the interrupted
    epoch's already-trained ones (`hides`) and what is still to apply.
    """

    def __init__(self, found=None, log=None):
        self.found = found
        self.log = log  # prints a line when verbose, or None
        # Batches of the resumed epoch trained before the restart: hidden
        # from every callback until the first batch this run trains.
        self.skip_until = None
        self._seek = 0  # steps the input still has to be advanced by, once
        self._metrics = None  # (specs, arrays): the epoch's running metrics
        self._values = None  # (state, arrays): `state=` objects to apply
        self._history = False  # fit's History still to prefill
        self._original_train_function = None
        self.began = set()  # `state=` callbacks whose on_train_begin ran

    @property
    def manifest(self):
        return None if self.found is None else self.found.manifest

    # -- 3 and 4: at the start of fit ------------------------------------
    def restore(self, model, training_state, data, epoch_iterator, fit=True):
        """Builds what the restore assigns, checks it matches, restores.

        `data` is the fit's `DataPosition`; `epoch_iterator` Keras 3's
        running `EpochIterator` (None under tf_keras). A custom loop
        (`fit=False`) continues the interrupted epoch itself: its input is
        positioned by its `state=` iterator and no batch is skipped here.
        """
        manifest, store, _ = self.found
        source = store.prefix(manifest.name)
        build_for_restore(model, manifest, source, epoch_iterator)
        training_state.check_compatible(manifest.variables, source)
        arrays = store.read_arrays(manifest)
        # The running metrics wait until Keras has reset them (step 5).
        training_state.assign(arrays, [
            g for g in manifest.variables if not g.startswith("metrics")])
        compat.set_initial_epoch(model, manifest.epoch)
        self._values = (manifest.state, arrays)
        # Plain objects now; callbacks once their own on_train_begin has run.
        self.apply_values(training_state, self.began | {
            e.name for e in training_state.entries if not e.is_callback})
        self._history = True
        data.set_resume(
            manifest.state.get(state_lib.DATA_POSITION),
            arrays.get(f"adapter/{state_lib.DATA_POSITION}", []))
        check_resumed_input(manifest, data, training_state)
        if manifest.batch > 0 and fit:
            self._metrics = (manifest.variables, arrays)
            self.skip_until = manifest.batch
            if epoch_iterator is not None:
                self._seek = manifest.batch
            else:
                self.install_skip(model, training_state)

    def apply_values(self, training_state, names):
        """Applies the restored state of the `state=` objects in `names`
        (all that are left when None)."""
        if self._values is None:
            return
        values, arrays = self._values
        training_state.apply_values(values, arrays, names)
        if names is None:
            self._values = None

    def prefill_history(self, model, epochs, logs):
        """Gives fit's `History` the epochs trained before the restart."""
        if not self._history:
            return
        self._history = False
        history = getattr(model, "history", None)
        if history is None or not hasattr(history, "history"):
            return
        if getattr(history, "epoch", None) == [] and epochs:
            history.epoch = list(epochs)
            history.history = {k: list(v) for k, v in logs.items()}

    def finish_pending(self, model, training_state, epochs, logs):
        """Applies what is still pending: `state=` objects, History."""
        self.apply_values(training_state, None)
        self.prefill_history(model, epochs, logs)

    # -- 5: the interrupted epoch -----------------------------------------
    def hides(self, batch):
        """Whether `batch` is one of the resumed epoch's trained ones."""
        return self.skip_until is not None and batch < self.skip_until

    def on_epoch_begin(self):
        """Running metrics only continue in the epoch they belong to."""
        if self.skip_until is None:
            self._metrics = None

    def trained(self):
        """A batch of this run was trained: nothing is hidden any more."""
        self.skip_until = None

    def epoch_batches(self, model, training_state, data, epoch_iterator,
                      enumerate_epoch):
        """The steps of each epoch that `fit` trains (see `DataPosition`)."""
        skip, self._seek = self._seek, 0

        def on_seek(last_batch):
            self.restore_metrics(model, training_state, epoch_iterator,
                                 last_batch)

        return data.batches(enumerate_epoch, skip, on_seek)

    def install_skip(self, model, training_state):
        """Consumes the already-trained batches of the interrupted epoch.

        For tf_keras' `fit`, which has no `EpochIterator` to seek: for the
        first calls of the resumed epoch `train_function` is replaced by one
        that only pulls the batches from the iterator, without training.
        """
        per_call = compat.steps_per_execution(model)
        remaining = [self.skip_until]

        def skip_or_train(iterator):
            if remaining[0] <= 0:
                compat.replace_train_function(model, original)
                return original(iterator)
            count = min(per_call, remaining[0])
            for _ in range(count):
                batch = next(iterator)
                self.restore_metrics(model, training_state, None, batch)
            remaining[0] -= count
            return model.get_metrics_result()

        original = compat.replace_train_function(model, skip_or_train)
        self._original_train_function = original

    def restore_metrics(self, model, training_state, epoch_iterator,
                        data_batch):
        """Restores the interrupted epoch's running metrics (once)."""
        if self._metrics is None:
            return
        specs, arrays = self._metrics
        self._metrics = None
        if data_batch is None and epoch_iterator is not None:
            dataset = compat.user_dataset(epoch_iterator)
            if dataset is not None:
                data_batch = compat.zeros_like_spec(dataset.element_spec)
        try:
            if data_batch is not None:
                compat.build_compiled_metrics(model, data_batch)
        except Exception:  # metrics stay as they are; weights are exact
            pass
        if not training_state.assign_metrics(specs, arrays) and self.log:
            self.log(
                "keras_ckpt: this epoch's running metrics could not be "
                "restored (the compiled metrics changed); they restart "
                "from the resumed batch.")

    def undo(self, model):
        """Puts back what a resume changed in `model` (end of fit)."""
        compat.clear_initial_epoch(model)
        if self._original_train_function is not None:
            compat.replace_train_function(model, self._original_train_function)
            self._original_train_function = None


def build_for_restore(model, manifest, source, epoch_iterator=None):
    """Creates the variables a restore assigns, whatever `built` says.

    Keras 3 creates what a model never called, or an optimizer never used,
    holds only when `fit` first traces `train_function`, after
    `on_train_begin`. Here, before the first update: a model not built yet
    is built from the shapes of the input (as Keras does under a
    distribution strategy), the compiled optimizer is built; if the
    checkpoint still holds variables that do not exist (an optimizer held as
    an attribute and used only in `train_step`, a layer built in `call`),
    `train_step` is traced once on the input's spec without running it.
    """
    causes = []
    if epoch_iterator is not None and compat.model_unbuilt(model):
        try:
            compat.build_from_input(model, epoch_iterator)
        except Exception as e:
            # No `call()` (a `train_step` model whose sub-models hold every
            # variable), or one that needs concrete values.
            causes.append(f"building it from the input's shapes failed: {e}")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and "optimizer" in manifest.variables and (
        not compat.optimizer_built(optimizer)
    ):
        optimizer.build(model.trainable_variables)
    if epoch_iterator is not None and (
        not model.variables or _unbuilt_optimizers(model, manifest)
    ):
        try:
            compat.trace_train_step(model, epoch_iterator)
        except Exception as e:
            causes.append(f"tracing its train_step failed: {e}")
    cause = "".join(f" ({c})" for c in causes)
    if not model.built and not model.variables:
        raise ValueError(
            "keras_ckpt.Checkpoint needs a model whose variables exist to "
            f"resume from {source}{cause}. Build it before fit(), e.g. with "
            "keras.Input(...) or by calling it on a batch of data."
        )
    for attr in _unbuilt_optimizers(model, manifest):
        raise ValueError(
            f"keras_ckpt.Checkpoint cannot resume from {source}: "
            f"`model.{attr}` is not built, so its slots would be "
            f"created (zeroed) after the restore{cause}. Build it before "
            f"fit(), e.g. `model.{attr}.build(<the sub-model it "
            "updates>.trainable_variables)`."
        )


def _unbuilt_optimizers(model, manifest):
    """Attributes of `model` holding an optimizer that the checkpoint holds
    slots for but that is not built."""
    return [attr for attr, other in state_lib.attribute_optimizers(model)
            if f"optimizer/{attr}" in manifest.variables
            and not compat.optimizer_built(other)]


def branch_note(store, manifest):
    """What a branch leaves behind in `store`, said once; None if nothing.

    The checkpoints committed after `manifest` are kept (retention treats
    them as older commits) but are no longer the latest: this run's
    checkpoints are numbered after them.
    """
    order = manifest_lib.step_of
    newer = [m.name for m in store.manifests()
             if order(m.name) > order(manifest.name)]
    if not newer:
        return None
    return (
        f"keras_ckpt: branching from {manifest.name} (step {manifest.step}); "
        f"{store.directory} holds later checkpoints ({', '.join(newer)}) of "
        "the run this one replaces: they stay as retention allows but are no "
        f"longer the latest, and this run's checkpoints are numbered after "
        f"{newer[-1]}.")


# ---------------------------------------------------------------------------
# Where exactness depends on the input or the hardware: say so once.
# ---------------------------------------------------------------------------


def warn_inexact(cause):
    warnings.warn(
        f"keras_ckpt cannot guarantee an exact resume: {cause}",
        UserWarning, stacklevel=3,
    )


def check_input(shuffles):
    """At every fit start: an unseeded tf.data shuffle cannot be resumed."""
    if any(not seeded for seeded, _ in shuffles):
        warn_inexact(
            "the tf.data pipeline given to fit() has a `shuffle` without "
            "a seed, so its order differs in every process and a resumed "
            "run trains on other batches than an uninterrupted one. Fix: "
            "pass `seed=` to `Dataset.shuffle` (or call "
            "`keras.utils.set_random_seed(...)` before building the "
            "dataset)."
        )


def check_resumed_input(manifest, data, training_state):
    """At a resume: the input and the replicas it can be exact with."""
    saved = manifest.state.get(state_lib.DATA_POSITION) or {}
    if data.kind == "generator" and saved.get("total"):
        warn_inexact(
            f"the input is a Python generator: to resume at step "
            f"{manifest.step} its first {saved['total']} batches are "
            "drawn again and dropped, which is exact only if it yields "
            "the same batches in the same order in every run (and costs "
            "reading them). Fix: use a `keras.utils.PyDataset` or a "
            "tf.data pipeline with seeded randomness."
        )
    saved_copies = len(manifest.variables.get("metrics/replicas", []))
    live_copies = len(training_state.specs().get("metrics/replicas", []))
    if manifest.batch > 0 and saved_copies != live_copies:
        warn_inexact(
            "the checkpoint was written with another number of local "
            "replicas than this run has: the interrupted epoch's running "
            "metrics are restored as their total, so the epoch's logged "
            "metrics may differ in the last digits (weights and optimizer "
            "state are exact). Fix: resume on as many devices, or resume "
            "from a checkpoint taken at an epoch boundary."
        )
