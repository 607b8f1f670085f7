"""Everything read from a store is untrusted (issue #11, cases 1-4, 9, 11).

Property-based tests (hypothesis) throw crafted manifests, object keys and
`checkpoint` pointer files at the local directory and at each emulated store
(file://, S3 via moto, GCS via fake-gcs-server, Azure via Azurite) through
every entry point: `list_checkpoints`, `keras-ckpt ls/verify/pull/push/
prune`, `Uploader.pull`, `restore`. Each asserts that only keras_ckpt's
documented errors come out, that nothing outside the directory or prefix is
written or deleted (a sentinel tree around it is compared before and after),
and that a crafted checkpoint is listed as invalid, with its reason. Plain
regression tests reproduce each case of the issue.
"""

import json
import logging
import os
import shutil
import tempfile
import uuid

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_ckpt
from keras_ckpt import cli
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.engine import resume as resume_lib
from keras_ckpt.errors import KerasCkptError
from keras_ckpt.manager import LocalCheckpoints
from keras_ckpt.manager import RetentionPolicy

# Modest example counts keep the file well under three minutes on 2 cores;
# the remote stores get fewer (every example makes a few dozen requests).
# A profile (not loaded globally, so other test files keep their own):
# deterministic examples, no deadline (emulators share 2 cores).
settings.register_profile(
    "untrusted", deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture,
                           HealthCheck.too_slow],
)
UNTRUSTED = settings.get_profile("untrusted")
LOCAL_EXAMPLES = 60
# moto answers S3 requests slowest (about 6 s an example on 2 busy cores).
REMOTE_EXAMPLES = {"file": 25, "s3": 15, "gs": 25, "az": 25}

VICTIM = "victim.txt"
VICTIM_BYTES = b"must survive"


# --- building stores ------------------------------------------------------


def fake_checkpoint(directory, step):
    """A checkpoint whose files are not TensorFlow's but whose manifest is
    valid: enough for listing, copying, verifying and pruning."""
    name = manifest_lib.checkpoint_name(step)
    files = [f"{name}.data-00000-of-00001", f"{name}.index"]
    for i, filename in enumerate(files):
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(bytes([step % 256, i]) * (step + 3))
    manifest = manifest_lib.Manifest(
        name=name, step=step, epoch=step // 4, batch=step % 4,
        timestamp=1.7e9 + step, files=manifest_lib.describe_files(
            directory, files),
        metrics={"loss": 1.0 / (step + 1)},
    )
    manifest_lib.atomic_write(os.path.join(directory, f"{name}.json"),
                              manifest.to_json())
    return json.loads(manifest.to_json())


def sentinel_tree(root):
    """Victim files a crafted name could reach, around the store."""
    os.makedirs(os.path.join(root, "victim-dir"), exist_ok=True)
    for path in (os.path.join(root, VICTIM),
                 os.path.join(root, "victim-dir", VICTIM),
                 os.path.join(root, "victim-dir", "settings.json")):
        with open(path, "wb") as f:
            f.write(VICTIM_BYTES)


def snapshot(root, skip):
    """{path: bytes} of every file under `root`, except under `skip`."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs
                   if os.path.join(directory, d) not in skip]
        for filename in files:
            path = os.path.join(directory, filename)
            with open(path, "rb") as f:
                found[path] = f.read()
    return found


def nasty_names(root):
    """File names a hostile store might put in a manifest or pointer."""
    victim = os.path.join(root, VICTIM)
    return [
        "..", ".", "", "/", "../" + VICTIM, "../../" + VICTIM,
        "./../victim-dir/" + VICTIM, victim, "/" + VICTIM,
        "ckpt-7.data-00000-of-00001/../../" + VICTIM,
        "..\\..\\" + VICTIM, "ckpt-7.index\x00", "ckpt-7.index\n",
        "ckpt-7.\u0131ndex", "ckpt-\u0667.index", "ckpt-7.data-00000-of-00001 ",
        "ckpt-8.index", "ckpt-07.index", "ckpt-7.json", "checkpoint",
        os.path.join(root, "victim-dir", "settings"), "ckpt-7.data-0-of-1",
        "ckpt-99999999999999999999999.index", "ckpt--1.index", "ckpt-+7.index",
    ]


def nasty_values(root):
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-2**80, max_value=2**80),
        st.floats(), st.text(max_size=12),
        st.lists(st.integers(min_value=-3, max_value=2**64), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        st.sampled_from(nasty_names(root)),
        st.sampled_from(["12MB", "ckpt-7", " ckpt-7", "+7", "7", "1e999",
                         "deadbeef", "DEADBEEF", {}, []]),
    )


FIELDS = ["name", "step", "epoch", "batch", "timestamp", "files", "metrics",
          "variables", "state", "history", "metadata", "format"]


@st.composite
def crafted_manifest(draw, base, root):
    """Bytes of a manifest for ckpt-7 that a hostile store might hold."""
    data = json.loads(json.dumps(base))
    name = "ckpt-7"
    kind = draw(st.sampled_from(
        ["field", "file_name", "file_entry", "metric", "drop", "document",
         "bytes", "variables"]))
    value = draw(nasty_values(root))
    if kind == "field":
        data[draw(st.sampled_from(FIELDS))] = value
    elif kind == "file_name":
        entry = next(iter(data["files"].values()))
        data["files"][draw(st.sampled_from(nasty_names(root)))] = entry
        if draw(st.booleans()):
            data["files"].pop(f"{name}.index")
    elif kind == "file_entry":
        entry = data["files"][f"{name}.index"]
        entry[draw(st.sampled_from(["size", "crc32c", "sha256"]))] = value
    elif kind == "metric":
        data["metrics"][draw(st.text(max_size=6))] = value
    elif kind == "drop":
        data.pop(draw(st.sampled_from(FIELDS)))
    elif kind == "variables":
        data["variables"] = {"model": [["dense/kernel", value, "float32"]]}
    elif kind == "document":
        data = value
    else:
        return draw(st.binary(max_size=64))
    return json.dumps(data).encode("utf-8")


@st.composite
def crafted_pointer(draw, root):
    names = draw(st.lists(st.sampled_from(
        nasty_names(root) + ["ckpt-5", "ckpt-7"]), min_size=1, max_size=4))
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=30)))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


# --- checks ---------------------------------------------------------------


def check_listing(infos):
    """The valid checkpoint is listed complete; anything else is listed
    with a reason, and a complete one lists only its own files."""
    by_name = {i.name: i for i in infos}
    assert by_name["ckpt-5"].complete and not by_name["ckpt-5"].problems
    for info in infos:
        assert manifest_lib.step_of(info.name) is not None
        if not info.complete:
            assert info.problems and all(
                isinstance(p, str) and p for p in info.problems)


def run_cli(capsys, *argv, codes=(0, 1)):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code in codes, (argv, code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 1:
        assert len(err.strip().splitlines()) == 1, err
    return code, out, err


def call(fn, *args, **kwargs):
    """Calls `fn`; only keras_ckpt's documented errors may come out."""
    try:
        return fn(*args, **kwargs)
    except KerasCkptError:
        return None


# --- property tests: the local directory -------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_crafted_local_directory_is_contained(tmp_path, capsys, tiny_model):
    root = str(tmp_path)
    sentinel_tree(root)
    stage = tempfile.mkdtemp(dir=root)
    fake_checkpoint(stage, 5)
    base = fake_checkpoint(stage, 7)

    @settings(UNTRUSTED, max_examples=LOCAL_EXAMPLES)
    @given(data=st.data())
    def run(data):
        example = tempfile.mkdtemp(dir=root)
        store = os.path.join(example, "store")
        shutil.copytree(stage, store)
        manifest = data.draw(crafted_manifest(base, root))
        with open(os.path.join(store, "ckpt-7.json"), "wb") as f:
            f.write(manifest)
        if data.draw(st.booleans()):
            with open(os.path.join(store, "checkpoint"), "wb") as f:
                f.write(data.draw(crafted_pointer(root)))
        mirror = os.path.join(example, "mirror")
        pulled = os.path.join(example, "pulled")
        before = snapshot(root, {store, mirror, pulled})

        infos = keras_ckpt.list_checkpoints(store)
        check_listing(infos)
        assert [i.name for i in LocalCheckpoints(store).manifests()] == [
            i.name for i in infos if i.complete]
        _, out, _ = run_cli(capsys, "ls", store, codes=(0,))
        if not {i.name: i for i in infos}["ckpt-7"].complete:
            assert "ckpt-7:" in out
        run_cli(capsys, "ls", store, "--json", codes=(0,))
        run_cli(capsys, "inspect", store)
        run_cli(capsys, "verify", store)
        run_cli(capsys, "push", store, "file://" + mirror, "--no-progress")
        run_cli(capsys, "pull", "file://" + mirror, pulled, "--no-progress")
        call(keras_ckpt.restore, tiny_model, store)
        call(resume_lib.find_checkpoint, True, LocalCheckpoints(store),
             None, RetentionPolicy())
        run_cli(capsys, "export", store, os.path.join(example, "export"),
                codes=(1,))
        run_cli(capsys, "prune", store, "--keep", "1")
        assert snapshot(root, {store, mirror, pulled}) == before
        assert os.path.exists(os.path.join(store, "ckpt-5.json")) or (
            os.path.exists(os.path.join(store, "ckpt-7.json")))
        shutil.rmtree(example)

    run()


# --- property tests: each emulated store -------------------------------------


def test_crafted_mirror_is_contained(mirror_url, tmp_path, capsys,
                                     tiny_model):
    root = str(tmp_path)
    sentinel_tree(root)
    stage = tempfile.mkdtemp(dir=root)
    fake_checkpoint(stage, 5)
    base = fake_checkpoint(stage, 7)
    mirror_dir = (mirror_url.removeprefix("file://")
                  if mirror_url.startswith("file://") else None)
    if mirror_dir:
        os.makedirs(mirror_dir)

    @settings(UNTRUSTED,
              max_examples=REMOTE_EXAMPLES[mirror_url.partition(":")[0]])
    @given(data=st.data())
    def run(data):
        url = f"{mirror_url}/{uuid.uuid4().hex[:8]}"
        uploader = keras_ckpt.get_uploader(url)
        uploader.push(stage)
        # Through the store's own primitive: the crafted bytes must arrive
        # whatever keras_ckpt thinks of them.
        uploader._write_bytes("ckpt-7.json",
                              data.draw(crafted_manifest(base, root)))
        if data.draw(st.booleans()):
            uploader._write_bytes("checkpoint",
                                  data.draw(crafted_pointer(root)))
        if data.draw(st.booleans()):
            # Files of no canonical checkpoint, next to those of ckpt-5.
            for key in ("ckpt-01.index", "ckpt-\u0663.index", "ckpt-3.data"):
                uploader._write_bytes(key, b"x")
        if data.draw(st.booleans()):
            # A nested key that looks like a checkpoint of this prefix.
            uploader._write_bytes("sub/ckpt-9.json", json.dumps(
                dict(base, name="ckpt-9", step=9)).encode())
        pulled = tempfile.mkdtemp(dir=root)
        resumed = tempfile.mkdtemp(dir=root)
        before = snapshot(root, {pulled, resumed, mirror_dir})

        infos = keras_ckpt.list_checkpoints(url)
        check_listing(infos)
        assert "ckpt-9" not in {i.name for i in infos}
        # (file:// URLs list as local directories: same shape, same answer)
        assert [(i.name, i.complete, len(i.problems)) for i in infos] == [
            (i.name, i.complete, len(i.problems))
            for i in uploader.list_checkpoints()]
        run_cli(capsys, "ls", url, codes=(0,))
        run_cli(capsys, "inspect", url + "/ckpt-7")
        run_cli(capsys, "verify", url)
        run_cli(capsys, "pull", url, pulled, "--no-progress")
        call(uploader.pull, pulled)
        local = keras_ckpt.list_checkpoints(pulled)
        assert all(i.complete for i in local)
        found = call(resume_lib.find_checkpoint, True,
                     LocalCheckpoints(resumed), uploader, RetentionPolicy())
        assert found is None or found[0].name in ("ckpt-5", "ckpt-7")
        call(keras_ckpt.restore, tiny_model, url)
        run_cli(capsys, "export", url, os.path.join(resumed, "export"),
                codes=(1,))
        run_cli(capsys, "prune", url, "--keep", "1")
        assert snapshot(root, {pulled, resumed, mirror_dir}) == before
        shutil.rmtree(pulled)
        shutil.rmtree(resumed)

    run()


@given(text=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
@settings(UNTRUSTED, max_examples=300)
def test_from_json_raises_only_corrupt_checkpoint_error(text):
    try:
        manifest = manifest_lib.Manifest.from_json(text, name="ckpt-7")
    except keras_ckpt.CorruptCheckpointError:
        return
    assert manifest.name == "ckpt-7"


@given(name=st.one_of(st.text(max_size=30), st.none(), st.integers()))
@settings(UNTRUSTED, max_examples=300)
def test_confined_never_leaves_the_directory(name):
    directory = os.path.join(os.sep, "store", "dir")
    try:
        path = manifest_lib.confined(directory, name)
    except keras_ckpt.CorruptCheckpointError:
        return
    assert os.path.dirname(os.path.normpath(path)) == directory
    assert "\x00" not in path


# --- regression tests, one per case of the issue ------------------------------


def write_key(url, key, data):
    keras_ckpt.get_uploader(url)._write_bytes(key, data)


def crafted_store(url, tmp_path, files):
    """Pushes a valid ckpt-5 and a ckpt-7 whose manifest lists `files`
    (a dict name -> bytes, each also written under its crafted key)."""
    stage = tmp_path / "stage"
    stage.mkdir()
    fake_checkpoint(str(stage), 5)
    keras_ckpt.get_uploader(url).push(str(stage))
    entries = {}
    for key, data in files.items():
        write_key(url, key, data)
        entries[key] = {"size": len(data),
                        "crc32c": "%08x" % __import__("google_crc32c").value(
                            data)}
    manifest = dict(json.loads((stage / "ckpt-5.json").read_text()),
                    name="ckpt-7", step=7, files=entries)
    write_key(url, "ckpt-7.json", json.dumps(manifest).encode())


def test_case1_pull_never_writes_outside_the_directory(s3_url, tmp_path,
                                                       capsys):
    sentinel_tree(str(tmp_path))
    target = tmp_path / "pulled"
    crafted_store(s3_url, tmp_path, {
        "./../victim-dir/owned.txt": b"attacker",
        "ckpt-7.index": b"i",
    })
    run_cli(capsys, "pull", s3_url, target, "--no-progress", codes=(0,))
    assert not (tmp_path / "victim-dir" / "owned.txt").exists()
    assert sorted(os.listdir(target)) == [
        "checkpoint", "ckpt-5.data-00000-of-00001", "ckpt-5.index",
        "ckpt-5.json"]
    _, out, _ = run_cli(capsys, "ls", s3_url, codes=(0,))
    assert "INVALID" in out and "./../victim-dir/owned.txt" in out


def test_case2_verify_never_touches_an_absolute_path(s3_url, tmp_path,
                                                     capsys):
    sentinel_tree(str(tmp_path))
    victim = str(tmp_path / VICTIM)
    crafted_store(s3_url, tmp_path, {victim: b"attacker",
                                     "ckpt-7.index": b"i"})
    code, out, err = run_cli(capsys, "verify", s3_url, codes=(1,))
    assert "BROKEN  ckpt-7" in out and "ckpt-7" in err
    with open(victim, "rb") as f:
        assert f.read() == VICTIM_BYTES


def test_case3_prune_never_deletes_outside_the_directory(tmp_path, capsys):
    sentinel_tree(str(tmp_path))
    store = tmp_path / "store"
    store.mkdir()
    for step in (1, 2, 3):
        fake_checkpoint(str(store), step)
    crafted = json.loads((store / "ckpt-3.json").read_text())
    crafted["name"] = str(tmp_path / "victim-dir" / "settings")
    (store / "ckpt-4.json").write_text(json.dumps(crafted))
    _, out, _ = run_cli(capsys, "prune", store, "--keep", "1", codes=(0,))
    assert (tmp_path / "victim-dir" / "settings.json").read_bytes() == (
        VICTIM_BYTES)
    assert "skip (incomplete)  ckpt-4" in out and "`name`" in out
    assert sorted(p.name for p in store.glob("*.json")) == [
        "ckpt-3.json", "ckpt-4.json"]
    # A crafted pointer names no path outside either.
    (store / "checkpoint").write_text(
        f'model_checkpoint_path: "{tmp_path}/victim-dir/settings"\n'
        'all_model_checkpoint_paths: "../victim-dir/settings"\n')
    assert manifest_lib.parse_pointer((store / "checkpoint").read_text()) == (
        None, [])


# The real-TensorFlow part: restore, resume and export past bad checkpoints.

def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def fit(model, directory, epochs, **kwargs):
    x = np.random.RandomState(1).rand(16, 4).astype("float32")
    ckpt = keras_ckpt.Checkpoint(directory=str(directory), save_freq=2,
                                 on_preemption=None, verbose=0,
                                 max_to_keep=None, **kwargs)
    model.fit(x, x.sum(axis=1), batch_size=4, epochs=epochs, shuffle=False,
              verbose=0, callbacks=[ckpt])
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ckpt-2, 4, 6, 8 of a real model (2 epochs of 4 batches)."""
    directory = tmp_path_factory.mktemp("trained") / "ckpts"
    fit(make_model(), directory, epochs=2)
    return directory


@pytest.fixture
def store(trained, tmp_path):
    path = tmp_path / "ckpts"
    shutil.copytree(trained, path)
    return path


def weights_of(directory, name):
    model = make_model()
    keras_ckpt.restore(model, directory / name)
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize("crafted", [
    {"size": "12MB"}, {}, [], None, "ckpt-9", {"step": -1}, {"name": "/x"},
])
def test_case4_one_malformed_manifest_breaks_nothing(store, capsys, crafted,
                                                     tmp_path):
    export = crafted == {"size": "12MB"}  # the slow part, once
    good = json.loads((store / "ckpt-8.json").read_text())
    if isinstance(crafted, dict) and crafted:
        if "size" in crafted:
            good["files"]["ckpt-8.index"]["size"] = crafted["size"]
        else:
            good.update(crafted)
        crafted = good
    (store / "ckpt-10.json").write_text(json.dumps(crafted))
    infos = keras_ckpt.list_checkpoints(store)
    assert [(i.name, i.complete) for i in infos] == [
        ("ckpt-2", True), ("ckpt-4", True), ("ckpt-6", True),
        ("ckpt-8", True), ("ckpt-10", False)]
    assert "ckpt-10.json is invalid" in infos[-1].problems[0] or (
        "not valid JSON" in infos[-1].problems[0])
    _, out, _ = run_cli(capsys, "ls", store, codes=(0,))
    assert "INVALID" in out
    assert keras_ckpt.restore(make_model(), store).name == "ckpt-8"
    found = resume_lib.find_checkpoint(
        True, LocalCheckpoints(store), None, RetentionPolicy())
    assert found[0].name == "ckpt-8"
    if export:
        run_cli(capsys, "export", store, tmp_path / "export", codes=(0,))
        assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    run_cli(capsys, "prune", store, "--keep", "1", codes=(0,))
    # (The writer lease, `.keras_ckpt-writer.json`, is not a checkpoint.)
    assert sorted(p.name for p in store.glob("ckpt-*.json")) == [
        "ckpt-10.json", "ckpt-8.json"]


def corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, wrong bytes
    path.write_bytes(bytes(raw))


def test_case9_resume_falls_back_past_a_corrupt_latest(store, caplog,
                                                        capsys):
    corrupt(store / "ckpt-8.data-00000-of-00001")
    expected = weights_of(store, "ckpt-6")
    with caplog.at_level(logging.WARNING, logger="keras_ckpt"):
        found = resume_lib.find_checkpoint(
            True, LocalCheckpoints(store), None, RetentionPolicy())
    assert found[0].name == "ckpt-6"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ckpt-8" in warnings[0]
    assert "CRC32C" in warnings[0]
    caplog.clear()

    # Through fit(): resumes from ckpt-6; step 8 is saved again as ckpt-9
    # (numbered after every checkpoint the directory holds), and the
    # damaged ckpt-8 is left for `keras-ckpt verify` to show.
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="keras_ckpt"):
        fit(model, store, epochs=2)
    warnings = [r.getMessage() for r in caplog.records
                if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "ckpt-8" in warnings[0]
    _, out, err = run_cli(capsys, "verify", store, codes=(1,))
    assert "ckpt-8" in err and "ckpt-9" not in err
    latest = keras_ckpt.list_checkpoints(store)[-1]
    assert (latest.name, latest.step, latest.complete) == ("ckpt-9", 8, True)

    # restore("latest") falls back too; a named corrupt one raises.
    corrupt(store / "ckpt-9.data-00000-of-00001")
    model = make_model()
    assert keras_ckpt.restore(model, store).name == "ckpt-6"
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="ckpt-9"):
        keras_ckpt.restore(make_model(), store, checkpoint=8)


def test_case9_remote_resume_falls_back_past_a_corrupt_latest(
        store, mirror_url, tmp_path, caplog):
    uploader = keras_ckpt.get_uploader(mirror_url)
    uploader.push(str(store))
    data = tmp_path / "bad"
    data.write_bytes(uploader.read_bytes("ckpt-8.data-00000-of-00001"))
    corrupt(data)
    uploader.upload_file(str(data), "ckpt-8.data-00000-of-00001")
    fresh = LocalCheckpoints(tmp_path / "fresh")
    with caplog.at_level(logging.WARNING, logger="keras_ckpt"):
        found = resume_lib.find_checkpoint(
            True, fresh, uploader, RetentionPolicy())
    assert found[0].name == "ckpt-6"
    warnings = [r.getMessage() for r in caplog.records
                if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and f"{mirror_url}/ckpt-8" in warnings[0]
    assert keras_ckpt.restore(make_model(), mirror_url).name == "ckpt-6"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_reader_falls_back_past_the_same_damaged_checkpoint(
        store, where, tmp_path, caplog, capsys, request):
    """restore(), load_model(), `keras-ckpt export` and resume read through
    one path: with the newest checkpoint's bytes flipped (sizes intact) and
    a valid older one beside it, all four use the older one, each with one
    warning naming the damaged one. (load_model used to pick by sizes only
    and fail with TensorFlow's own "Checksum does not match".)"""
    expected = weights_of(store, "ckpt-6")
    corrupt(store / "ckpt-8.data-00000-of-00001")
    source = str(store)
    if where == "s3":
        source = request.getfixturevalue("s3_url")
        keras_ckpt.get_uploader(source).push(str(store))

    def one_warning_about_ckpt_8():
        warnings = [r.getMessage() for r in caplog.records
                    if "damaged" in r.getMessage()]
        caplog.clear()
        assert len(warnings) == 1 and "ckpt-8" in warnings[0], warnings

    def same_weights(model):
        for got, want in zip(model.get_weights(), expected):
            np.testing.assert_array_equal(got, want)

    with caplog.at_level(logging.WARNING, logger="keras_ckpt"):
        model = make_model()
        assert keras_ckpt.restore(model, source).name == "ckpt-6"
        same_weights(model)
        one_warning_about_ckpt_8()

        same_weights(keras_ckpt.load_model(source))
        one_warning_about_ckpt_8()

        out = tmp_path / "export"
        _, printed, _ = run_cli(capsys, "export", source, out, codes=(0,))
        assert "Exported ckpt-6 " in printed
        one_warning_about_ckpt_8()

        if where == "local":
            found = resume_lib.find_checkpoint(
                True, LocalCheckpoints(store), None, RetentionPolicy())
        else:
            found = resume_lib.find_checkpoint(
                True, LocalCheckpoints(tmp_path / "fresh"),
                keras_ckpt.get_uploader(source), RetentionPolicy())
        assert found.manifest.name == "ckpt-6"
        one_warning_about_ckpt_8()

    # The damaged checkpoint named by step is refused by every reader.
    for read in (lambda: keras_ckpt.restore(make_model(), source,
                                            checkpoint=8),
                 lambda: keras_ckpt.load_model(source, checkpoint=8)):
        with pytest.raises(keras_ckpt.CorruptCheckpointError,
                           match="ckpt-8"):
            read()


def test_a_missing_branch_point_is_not_found(tmp_path):
    """`resume=` / `restore()` of a checkpoint path whose directory does not
    exist: CheckpointNotFoundError naming it (it was a CorruptCheckpointError
    with an empty reason)."""
    missing = tmp_path / "runs" / "base" / "ckpt-12000"
    with pytest.raises(keras_ckpt.CheckpointNotFoundError,
                       match="runs/base"):
        keras_ckpt.restore(make_model(), missing)
    with pytest.raises(keras_ckpt.CheckpointNotFoundError,
                       match="runs/base"):
        fit(make_model(), tmp_path / "trial-7", epochs=1,
            resume=str(missing))


def test_case11_downloads_are_fsynced_before_the_manifest(store, file_url,
                                                          tmp_path,
                                                          monkeypatch):
    uploader = keras_ckpt.get_uploader(file_url)
    uploader.push(str(store))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", os.path.basename(path)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(str(src)),
                       os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    uploader.download_checkpoint("ckpt-8", str(tmp_path / "down"))
    renames = [e for e in events if e[0] == "rename"]
    for _, tmp, final in renames:
        if final.endswith(".json"):
            continue
        assert events.index(("fsync", tmp)) < events.index(
            ("rename", tmp, final)), events
    assert {final for _, _, final in renames} >= {
        "ckpt-8.data-00000-of-00001", "ckpt-8.index", "ckpt-8.json"}
    # The manifest is committed last, after the directory entries.
    assert renames[-1][2] == "ckpt-8.json"


def test_case11_configs_are_rebuilt_in_safe_mode_only(store, capsys,
                                                      tmp_path):
    with open(os.path.join(os.path.dirname(__file__), "..",
                           "pyproject.toml")) as f:
        assert '"keras>=3.14.0"' in f.read()
    lambda_model = keras.Sequential([
        keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2),
        keras.layers.Dense(2), keras.layers.Dense(1)])
    manifest = json.loads((store / "ckpt-8.json").read_text())
    manifest["metadata"]["model_config"] = (
        keras.saving.serialize_keras_object(lambda_model))
    (store / "ckpt-8.json").write_text(json.dumps(manifest))
    # Even a process that allowed unsafe deserialization for its own
    # models never runs code from a checkpoint's config.
    from keras.src.backend.common import global_state
    from keras.src.saving import serialization_lib

    original = serialization_lib.in_safe_mode()
    keras.config.enable_unsafe_deserialization()
    try:
        _, _, err = run_cli(capsys, "export", store, tmp_path / "export",
                            codes=(1,))
    finally:
        global_state.set_global_attribute("safe_mode_saving", original)
    assert "safe_mode" in err or "Lambda" in err
    assert not (tmp_path / "export").exists()


def test_case9_resume_refuses_when_every_checkpoint_is_damaged(store):
    for data in store.glob("*.data-*"):
        corrupt(data)
    with pytest.raises(keras_ckpt.CorruptCheckpointError,
                       match="Every checkpoint .* is damaged.*ckpt-8.*CRC32C"):
        fit(make_model(), store, epochs=1)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="ckpt-2"):
        keras_ckpt.restore(make_model(), store)


def test_uploader_file_operations_stay_under_the_prefix(mirror_url,
                                                        tmp_path):
    root = str(tmp_path)
    sentinel_tree(root)
    if mirror_url.startswith("file://"):
        os.makedirs(mirror_url.removeprefix("file://"))
    uploader = keras_ckpt.get_uploader(mirror_url + "/run")
    local = tmp_path / "local.bin"
    local.write_bytes(b"payload")
    before = snapshot(root, {str(tmp_path / "mirror"), str(local)})
    keys = ["..", "../" + VICTIM, "../../" + VICTIM, "a/../../" + VICTIM,
            "/" + VICTIM, os.path.join(root, VICTIM), "a//b", "a/./b",
            "..\\" + VICTIM, "ckpt-1.index\x00", "", "/"]
    for key in keys:
        for op in (lambda: uploader.read_bytes(key),
                   lambda: uploader.write_bytes(key, b"attacker"),
                   lambda: uploader.upload_file(str(local), key),
                   lambda: uploader.download_file(key, str(tmp_path / "d")),
                   lambda: uploader.delete_file(key)):
            with pytest.raises(keras_ckpt.CorruptCheckpointError,
                               match="Refusing the object name"):
                op()
    assert snapshot(root, {str(tmp_path / "mirror"), str(local)}) == before
    assert not (tmp_path / "d").exists()
    # Ordinary nested names (a SavedModel export) still work.
    uploader.write_bytes("1/variables/variables.index", b"ok")
    assert uploader.read_bytes("1/variables/variables.index") == b"ok"
