"""One conformance suite for every uploader (file, s3, gs, az), run for real
against the emulators started in conftest.py, plus the registry and the
retry behaviour under injected network faults."""

import json
import os
import subprocess
import sys
import time
import types
import uuid

import numpy as np
import pytest
import tensorflow as tf

from keras_ckpt import manifest as manifest_lib
from keras_ckpt.errors import CheckpointNotFoundError
from keras_ckpt.errors import CorruptCheckpointError
from keras_ckpt.errors import MissingDependencyError
from keras_ckpt.errors import StorageError
from keras_ckpt.store import Store
from keras_ckpt.store import Uploader
from keras_ckpt.store import UploaderOptions
from keras_ckpt.store import get_uploader
from keras_ckpt.store import register_uploader
from keras_ckpt.store import registry
from keras_ckpt.store.local import LocalStore

from conftest import _URL_FIXTURES

MiB = 1024 * 1024
# Quick failure for tests; the defaults are meant for real networks.
FAST = dict(retries=2, backoff=0.01, max_backoff=0.05, timeout=10,
            check_timeout=5)


# --- local checkpoints to mirror -------------------------------------------


def write_checkpoint(directory, step, nfloats, seed):
    """Writes a real `tf.train.Checkpoint` `ckpt-<step>` and its manifest.

    Returns the variable's values.
    """
    name = manifest_lib.checkpoint_name(step)
    values = np.random.default_rng(seed).standard_normal(nfloats)
    values = values.astype("float32")
    tf.train.Checkpoint(v=tf.Variable(values)).write(
        os.path.join(directory, name)
    )
    files = sorted(
        f for f in os.listdir(directory)
        if f.startswith(f"{name}.") and not f.endswith(".json")
    )
    manifest = manifest_lib.Manifest(
        name=name, step=step, epoch=step // 10, batch=step % 10,
        timestamp=time.time(), files=manifest_lib.describe_files(directory, files),
        metrics={"loss": 1.0 / step},
    )
    manifest_lib.atomic_write(
        os.path.join(directory, manifest_lib.manifest_name(name)),
        manifest.to_json(),
    )
    return values


def write_pointer(directory, names):
    manifest_lib.atomic_write(
        os.path.join(directory, manifest_lib.POINTER_NAME),
        manifest_lib.format_pointer(names),
    )


def read_variable(prefix, like):
    variable = tf.Variable(np.zeros_like(like))
    tf.train.Checkpoint(v=variable).read(prefix).assert_consumed()
    return variable.numpy()


def data_file(name):
    return f"{name}.data-00000-of-00001"


@pytest.fixture(scope="session")
def local_ckpts(tmp_path_factory):
    """A local directory with ckpt-1, ckpt-2, ckpt-3 (1 MiB each) and a
    pointer. Shared by all tests: never modify it."""
    directory = str(tmp_path_factory.mktemp("local"))
    values = {}
    for step in (1, 2, 3):
        values[f"ckpt-{step}"] = write_checkpoint(
            directory, step, MiB // 4, seed=step
        )
    write_pointer(directory, list(values))
    return types.SimpleNamespace(dir=directory, values=values)


@pytest.fixture(scope="session")
def large_ckpt(tmp_path_factory):
    """ckpt-7 with a 20 MiB data file. Shared: never modify it."""
    directory = str(tmp_path_factory.mktemp("large"))
    values = write_checkpoint(directory, 7, 5 * MiB, seed=7)
    return types.SimpleNamespace(dir=directory, values=values)


@pytest.fixture(params=["local", *_URL_FIXTURES])
def mirror_url(request):
    """The conformance suite's stores: the local checkpoint directory
    (`local`) and every mirror of conftest's `mirror_url`."""
    fixture = "local_url" if request.param == "local" else (
        _URL_FIXTURES[request.param])
    return request.getfixturevalue(fixture)


def scheme_of(url):
    return url.split("://", 1)[0]


def missing_bucket_url(url):
    """A URL like `url` whose bucket (or parent directory) does not exist."""
    missing = f"kc-missing-{uuid.uuid4().hex[:8]}"
    if scheme_of(url) == "file":
        return f"file:///{missing}/mirror", f"/{missing}"
    return f"{scheme_of(url)}://{missing}/runs/x", missing


# --- conformance: every uploader ------------------------------------------


def test_check_passes_and_writes_nothing(mirror_url):
    uploader = get_uploader(mirror_url, **FAST)
    uploader.check()
    uploader.check(write=True)
    assert uploader.list_files() == {}
    assert uploader.list_checkpoints() == []
    assert uploader.latest_complete() is None
    assert uploader.read_pointer() == (None, [])


def test_check_names_missing_bucket(mirror_url):
    url, bucket = missing_bucket_url(mirror_url)
    uploader = get_uploader(url, **FAST)
    start = time.monotonic()
    with pytest.raises(StorageError, match=bucket) as error:
        uploader.check()
    assert time.monotonic() - start < 5
    assert "does not exist" in str(error.value)
    # The other operations say the same thing rather than "empty".
    with pytest.raises(StorageError, match=bucket):
        uploader.list_checkpoints()


def test_mirror_commits_a_restorable_checkpoint(mirror_url, local_ckpts,
                                                tmp_path):
    uploader = get_uploader(mirror_url, **FAST)
    uploader.mirror(local_ckpts.dir, "ckpt-2", keep_names=["ckpt-2"])

    local = manifest_lib.Manifest.read(
        os.path.join(local_ckpts.dir, "ckpt-2.json")
    )
    assert set(uploader.list_files()) == {
        "ckpt-2.json", "ckpt-2.index", data_file("ckpt-2"), "checkpoint"
    }
    [info] = uploader.list_checkpoints()
    assert info.name == "ckpt-2" and info.complete
    assert info.url == f"{mirror_url}/ckpt-2" and info.path is None
    assert (info.step, info.epoch, info.batch) == (2, 0, 2)
    assert info.metrics == {"loss": 0.5}
    assert info.size == local.total_bytes
    assert uploader.read_manifest("ckpt-2") == local
    assert uploader.latest_complete() == "ckpt-2"
    assert uploader.read_pointer() == ("ckpt-2", ["ckpt-2"])

    prefix = uploader.download_checkpoint("ckpt-2", str(tmp_path / "restore"))
    assert prefix == str(tmp_path / "restore" / "ckpt-2")
    np.testing.assert_array_equal(
        read_variable(prefix, local_ckpts.values["ckpt-2"]),
        local_ckpts.values["ckpt-2"],
    )
    assert manifest_lib.Manifest.read(prefix + ".json") == local
    assert sorted(os.listdir(tmp_path / "restore")) == sorted(local.files) + [
        "ckpt-2.json"
    ]


def test_pointer_is_tensorflows_format(mirror_url, local_ckpts):
    uploader = get_uploader(mirror_url, **FAST)
    for name in ("ckpt-1", "ckpt-2"):
        uploader.upload_checkpoint(local_ckpts.dir, name)
    uploader.commit(["ckpt-1", "ckpt-2"], timestamps=[10.0, 20.0])
    text = uploader.read_bytes("checkpoint").decode()
    assert text.startswith('model_checkpoint_path: "ckpt-2"\n')
    assert "all_model_checkpoint_timestamps: 20.0" in text
    if scheme_of(mirror_url) == "file":
        path = mirror_url[len("file://"):]
        assert tf.train.latest_checkpoint(path) == f"{path}/ckpt-2"


def test_retention_deletes_dropped_checkpoints(mirror_url, local_ckpts):
    uploader = get_uploader(mirror_url, **FAST)
    uploader.mirror(local_ckpts.dir, "ckpt-1", ["ckpt-1"])
    uploader.mirror(local_ckpts.dir, "ckpt-2", ["ckpt-1", "ckpt-2"])
    uploader.mirror(local_ckpts.dir, "ckpt-3", ["ckpt-2", "ckpt-3"])

    assert [i.name for i in uploader.list_checkpoints()] == ["ckpt-2", "ckpt-3"]
    assert not [f for f in uploader.list_files() if f.startswith("ckpt-1.")]
    assert uploader.read_pointer() == ("ckpt-3", ["ckpt-2", "ckpt-3"])
    # Leftovers of an interrupted upload are cleaned up by retention too.
    uploader.upload_file(
        os.path.join(local_ckpts.dir, data_file("ckpt-1")), data_file("ckpt-1")
    )
    uploader.retain(["ckpt-3"])
    assert sorted(uploader.list_files()) == sorted(
        ["checkpoint", "ckpt-3.json", "ckpt-3.index", data_file("ckpt-3")]
    )
    with pytest.raises(ValueError, match="keep_names"):
        uploader.mirror(local_ckpts.dir, "ckpt-1", ["ckpt-3"])


def test_delete_checkpoint(mirror_url, local_ckpts):
    uploader = get_uploader(mirror_url, **FAST)
    uploader.upload_checkpoint(local_ckpts.dir, "ckpt-1")
    uploader.upload_checkpoint(local_ckpts.dir, "ckpt-2")
    uploader.delete_checkpoint("ckpt-1")
    uploader.delete_checkpoint("ckpt-1")  # already gone: not an error
    assert sorted(uploader.list_files()) == sorted(
        ["ckpt-2.json", "ckpt-2.index", data_file("ckpt-2")]
    )


def test_incomplete_checkpoints_are_never_latest(mirror_url, local_ckpts,
                                                 tmp_path):
    uploader = get_uploader(mirror_url, **FAST)
    # Data and index without a manifest: an upload cut short.
    for filename in (data_file("ckpt-3"), "ckpt-3.index"):
        uploader.upload_file(os.path.join(local_ckpts.dir, filename), filename)
    assert uploader.list_checkpoints() == []
    assert uploader.latest_complete() is None

    uploader.upload_checkpoint(local_ckpts.dir, "ckpt-1")
    uploader.upload_checkpoint(local_ckpts.dir, "ckpt-2")
    # A manifest whose data file is gone.
    uploader.delete_file(data_file("ckpt-2"))
    infos = {i.name: i.complete for i in uploader.list_checkpoints()}
    assert infos == {"ckpt-1": True, "ckpt-2": False}
    assert uploader.latest_complete() == "ckpt-1"

    # The pointer names only what is complete there: never the broken one,
    # and one broken checkpoint never blocks the pointer.
    with pytest.raises(StorageError, match="ckpt-2"):
        uploader.commit(["ckpt-2"])
    assert uploader.read_pointer() == (None, [])
    assert uploader.commit(["ckpt-1", "ckpt-2"]) == ["ckpt-1"]
    assert uploader.read_pointer() == ("ckpt-1", ["ckpt-1"])
    target = tmp_path / "restore"
    with pytest.raises(CorruptCheckpointError, match=data_file("ckpt-2")):
        uploader.download_checkpoint("ckpt-2", str(target))
    assert os.listdir(target) == []
    with pytest.raises(CheckpointNotFoundError, match="ckpt-9"):
        uploader.download_checkpoint("ckpt-9", str(target))


def test_download_detects_corruption(mirror_url, local_ckpts, tmp_path):
    uploader = get_uploader(mirror_url, **FAST)
    uploader.upload_checkpoint(local_ckpts.dir, "ckpt-1")
    name = data_file("ckpt-1")
    data = bytearray(uploader.read_bytes(name))
    data[len(data) // 2] ^= 0xFF
    uploader.write_bytes(name, bytes(data))
    # Same size: listing alone cannot tell.
    assert uploader.latest_complete() == "ckpt-1"

    target = tmp_path / "restore"
    with pytest.raises(CorruptCheckpointError) as error:
        uploader.download_checkpoint("ckpt-1", str(target))
    assert name in str(error.value) and mirror_url in str(error.value)
    assert "CRC32C" in str(error.value)
    assert os.listdir(target) == []  # no partial or temporary file left
    # Without verification the sizes match and the files are taken.
    uploader.download_checkpoint("ckpt-1", str(target), verify=False)
    assert os.path.exists(target / "ckpt-1.json")


def test_small_objects(mirror_url, tmp_path):
    uploader = get_uploader(mirror_url, **FAST)
    assert uploader.read_bytes("lock") is None
    assert uploader.write_bytes("lock", b"first", if_absent=True) is True
    assert uploader.write_bytes("lock", b"second", if_absent=True) is False
    assert uploader.read_bytes("lock") == b"first"
    assert uploader.write_bytes("lock", "third") is True
    assert uploader.read_bytes("lock") == b"third"
    uploader.write_bytes("nested/dir/file.txt", b"x")
    assert uploader.list_files() == {"lock": 5, "nested/dir/file.txt": 1}
    uploader.delete_file("lock")
    uploader.delete_file("lock")
    assert uploader.read_bytes("lock") is None
    with pytest.raises(CheckpointNotFoundError, match="absent"):
        # Never os.devnull here: google-cloud-storage deletes the target
        # file when a download fails, and /dev/null is shared by everyone.
        uploader.download_file("absent", str(tmp_path / "absent"))


def test_same_name_new_content_is_reuploaded(mirror_url, tmp_path):
    # A run resumed from an earlier step saves ckpt-5 again: same name, same
    # sizes, different tensors. Size alone must not count as "uploaded".
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    write_checkpoint(str(first), 5, 4096, seed=1)
    values = write_checkpoint(str(second), 5, 4096, seed=2)
    uploader = get_uploader(mirror_url, **FAST)
    uploader.mirror(str(first), "ckpt-5", ["ckpt-5"])
    uploader.mirror(str(second), "ckpt-5", ["ckpt-5"])
    prefix = uploader.download_checkpoint("ckpt-5", str(tmp_path / "restore"))
    np.testing.assert_array_equal(read_variable(prefix, values), values)


def test_push_and_pull_resume(mirror_url, local_ckpts, tmp_path):
    uploader = get_uploader(mirror_url, **FAST)
    sent = []
    assert uploader.push(local_ckpts.dir, progress=sent.append) == [
        "ckpt-1", "ckpt-2", "ckpt-3"
    ]
    total = sum(
        manifest_lib.Manifest.read(
            os.path.join(local_ckpts.dir, f"ckpt-{s}.json")
        ).total_bytes
        for s in (1, 2, 3)
    )
    assert sum(sent) == total
    assert uploader.read_pointer() == ("ckpt-3", ["ckpt-1", "ckpt-2", "ckpt-3"])
    sent.clear()
    uploader.push(local_ckpts.dir, progress=sent.append)
    assert sum(sent) == 0  # already mirrored: nothing re-sent

    target = str(tmp_path / "pulled")
    received = []
    assert uploader.pull(target, progress=received.append) == [
        "ckpt-1", "ckpt-2", "ckpt-3"
    ]
    assert sum(received) == total
    assert tf.train.latest_checkpoint(target) == os.path.join(target, "ckpt-3")
    np.testing.assert_array_equal(
        read_variable(os.path.join(target, "ckpt-3"),
                      local_ckpts.values["ckpt-3"]),
        local_ckpts.values["ckpt-3"],
    )
    received.clear()
    uploader.pull(target, progress=received.append)
    assert sum(received) == 0  # already present: nothing fetched
    with pytest.raises(CheckpointNotFoundError, match="ckpt-8"):
        uploader.pull(target, names=["ckpt-8"])


def test_large_file_goes_in_parts(mirror_url, large_ckpt, tmp_path,
                                  monkeypatch):
    resumable = []
    if scheme_of(mirror_url) == "gs":
        # The emulator cannot tell us, so watch (not replace) the SDK path.
        from google.cloud.storage.blob import Blob

        real = Blob._do_resumable_upload

        def spy(blob, *args, **kwargs):
            resumable.append(blob.chunk_size)
            return real(blob, *args, **kwargs)

        monkeypatch.setattr(Blob, "_do_resumable_upload", spy)
    uploader = get_uploader(
        mirror_url, multipart_threshold=8 * MiB, chunk_size=5 * MiB,
        max_concurrency=4, **FAST,
    )
    uploader.mirror(large_ckpt.dir, "ckpt-7", ["ckpt-7"])
    name = data_file("ckpt-7")
    size = os.path.getsize(os.path.join(large_ckpt.dir, name))
    assert size >= 20 * MiB
    assert uploader.list_files()[name] == size
    key = f"{uploader.prefix}/{name}"
    parts = -(-size // (5 * MiB))
    if uploader.scheme == "s3":
        import boto3

        etag = boto3.client("s3").head_object(
            Bucket=uploader.bucket, Key=key
        )["ETag"]
        assert etag.strip('"').endswith(f"-{parts}")  # a multipart upload
    elif uploader.scheme == "az":
        from azure.storage.blob import BlobClient

        blob = BlobClient.from_connection_string(
            os.environ["AZURE_STORAGE_CONNECTION_STRING"], uploader.bucket, key
        )
        committed, _ = blob.get_block_list()
        assert len(committed) == parts
    elif uploader.scheme == "gs":
        assert resumable == [5 * MiB]  # only the data file is that large
    prefix = uploader.download_checkpoint("ckpt-7", str(tmp_path))
    np.testing.assert_array_equal(
        read_variable(prefix, large_ckpt.values), large_ckpt.values
    )


# --- construction, options and the registry -------------------------------


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(ValueError, match="`ftp`") as error:
        get_uploader("ftp://host/path")
    for scheme in ("file", "s3", "gs", "az"):
        assert scheme in str(error.value)


@pytest.mark.parametrize("url", [
    "s3://", "s3:///prefix-without-bucket", "gs://b/p?x=1",
    "file://relative/dir", "file:///", "/abs/path/without/scheme", 42,
])
def test_malformed_urls_are_rejected(url, cloud_env):
    with pytest.raises(ValueError, match="url|scheme"):
        get_uploader(url)


def test_options_are_validated():
    with pytest.raises(ValueError, match="`retries`. Received: retries=-1"):
        get_uploader("file:///tmp/x", retries=-1)
    with pytest.raises(ValueError, match="`chunk_size`"):
        UploaderOptions(chunk_size=MiB)
    with pytest.raises(ValueError, match="`timeout`"):
        UploaderOptions(timeout=0)
    with pytest.raises(ValueError, match="retrys"):
        get_uploader("file:///tmp/x", retrys=3)
    options = UploaderOptions(retries=7)
    assert get_uploader("file:///tmp/x", options=options).options is options


def test_get_uploader_returns_an_uploader_as_is():
    uploader = get_uploader("file:///tmp/x")
    assert isinstance(uploader, LocalStore)
    assert uploader.url == "file:///tmp/x"
    assert get_uploader(uploader) is uploader
    with pytest.raises(ValueError, match="retries"):
        get_uploader(uploader, retries=2)


class DirUploader(LocalStore):
    """`dir:///path`: a LocalStore under another scheme."""

    def _parse_url(self, url):
        return super()._parse_url("file" + url[len("dir"):])


def test_register_uploader(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_uploader("dir", f"{__name__}:DirUploader")
    assert isinstance(get_uploader(f"dir://{tmp_path}"), DirUploader)
    register_uploader("dir", f"{__name__}:DirUploader")  # same: fine
    with pytest.raises(ValueError, match="clobber"):
        register_uploader("s3", DirUploader)
    register_uploader("s3", DirUploader, clobber=True)
    assert registry._uploader_class("s3", "s3://x") is DirUploader
    with pytest.raises(ValueError, match="uploader"):
        register_uploader("other", object)


@pytest.fixture(scope="module")
def import_report(tmp_path_factory):
    """What a fresh interpreter sees: SDKs imported by `import keras_ckpt`,
    and the errors for each cloud scheme when its SDK is missing."""
    script = tmp_path_factory.mktemp("imports") / "check.py"
    script.write_text(
        "import json, sys\n"
        "import keras_ckpt, keras_ckpt.store\n"
        "keras_ckpt.store.get_uploader('file:///tmp/x').check\n"
        "sdks = ('boto3', 'botocore', 's3transfer', 'google.cloud',\n"
        "        'google.cloud.storage', 'google.auth', 'azure',\n"
        "        'azure.storage.blob', 'azure.identity')\n"
        "report = {'imported': [m for m in sdks if m in sys.modules]}\n"
        "for mod in ('boto3', 'google.cloud.storage', 'azure.storage.blob'):\n"
        "    sys.modules[mod] = None\n"
        "for url in ('s3://b/p', 'gs://b/p', 'az://c/p'):\n"
        "    try:\n"
        "        keras_ckpt.store.get_uploader(url)\n"
        "        report[url] = 'no error'\n"
        "    except Exception as e:\n"
        "        report[url] = [type(e).__name__, str(e),\n"
        "                       isinstance(e, ImportError)]\n"
        "print(json.dumps(report))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True,
        env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_keras_ckpt_imports_no_cloud_sdk(import_report):
    assert import_report["imported"] == []


@pytest.mark.parametrize("url,extra", [
    ("s3://b/p", "s3"), ("gs://b/p", "gcs"), ("az://c/p", "azure"),
])
def test_missing_sdk_names_the_extra(import_report, url, extra):
    kind, message, is_import_error = import_report[url]
    assert kind == MissingDependencyError.__name__
    assert is_import_error
    assert f"pip install 'keras-ckpt[{extra}]'" in message


# --- credentials ----------------------------------------------------------


def test_azure_needs_an_account(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_URL", raising=False)
    with pytest.raises(StorageError) as error:
        get_uploader("az://container/prefix")
    message = str(error.value)
    assert "az://container/prefix" in message
    assert "AZURE_STORAGE_CONNECTION_STRING" in message
    assert "AZURE_STORAGE_ACCOUNT_URL" in message


def test_azure_wrong_key_is_refused(azure_url, monkeypatch):
    good = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    key = good.split("AccountKey=")[1].split(";")[0]
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        good.replace(key, "A" * (len(key) - 2) + "=="),
    )
    uploader = get_uploader(azure_url, **FAST)
    with pytest.raises(StorageError, match="refused access") as error:
        uploader.check()
    assert uploader.bucket in str(error.value)


def test_s3_without_credentials(s3_url, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="No AWS credentials") as error:
        get_uploader(s3_url, **FAST).check()
    assert "AWS_ACCESS_KEY_ID" in str(error.value)


def test_local_parent_must_exist_but_mirror_dir_is_created(tmp_path):
    uploader = get_uploader(f"file://{tmp_path}/a", **FAST)
    uploader.check()
    uploader.write_bytes("x", b"1")
    assert (tmp_path / "a" / "x").read_bytes() == b"1"
    with pytest.raises(StorageError, match=str(tmp_path / "b")):
        get_uploader(f"file://{tmp_path}/b/c", **FAST).write_bytes("x", b"1")


# --- retries under injected faults ----------------------------------------


def test_connection_resets_are_retried(proxied_mirror, local_ckpts, tmp_path):
    url, proxy, _ = proxied_mirror
    uploader = get_uploader(url, retries=4, backoff=0.01, max_backoff=0.05,
                            request_retries=0, timeout=10)
    uploader.check()
    proxy.reset_next(3)
    uploader.mirror(local_ckpts.dir, "ckpt-1", ["ckpt-1"])
    assert proxy.resets == 3
    assert uploader.latest_complete() == "ckpt-1"
    prefix = uploader.download_checkpoint("ckpt-1", str(tmp_path))
    np.testing.assert_array_equal(
        read_variable(prefix, local_ckpts.values["ckpt-1"]),
        local_ckpts.values["ckpt-1"],
    )


def test_stalled_request_times_out_and_is_retried(proxied_mirror):
    url, proxy, _ = proxied_mirror
    uploader = get_uploader(url, retries=2, backoff=0.01, request_retries=0,
                            timeout=1)
    uploader.write_bytes("note", b"hello")
    # Only the read: the GCS SDK also fetches bucket metadata in the
    # background, whenever it likes.
    proxy.stall_next(1, match=b"note")
    start = time.monotonic()
    assert uploader.read_bytes("note") == b"hello"
    assert proxy.stalls == 1
    assert time.monotonic() - start >= 0.9  # it did wait for the timeout


def test_check_fails_fast_when_the_store_hangs(proxied_mirror):
    url, proxy, _ = proxied_mirror
    uploader = get_uploader(url, timeout=60, check_timeout=1, retries=5,
                            backoff=0.01)
    proxy.stall_next(10)
    start = time.monotonic()
    with pytest.raises(StorageError, match="after 2 attempts"):
        uploader.check()
    assert time.monotonic() - start < 6  # not 60 s, not 6 attempts


@pytest.mark.parametrize("cut", ["mid-data", "after-data"])
def test_persistent_failure_keeps_the_previous_checkpoint(
        proxied_mirror, local_ckpts, cut):
    url, proxy, _ = proxied_mirror
    uploader = get_uploader(url, retries=2, backoff=0.01, max_backoff=0.05,
                            request_retries=0, timeout=5)
    uploader.mirror(local_ckpts.dir, "ckpt-1", ["ckpt-1"])

    size = os.path.getsize(os.path.join(local_ckpts.dir, data_file("ckpt-2")))
    # The network dies for good partway through the data file, or just
    # after it (while the index, listing or manifest are being sent).
    proxy.fail_after(size // 2 if cut == "mid-data" else size + 3000)
    with pytest.raises(StorageError) as error:
        uploader.mirror(local_ckpts.dir, "ckpt-2", ["ckpt-1", "ckpt-2"])
    assert url in str(error.value)
    assert proxy.resets > 0

    proxy.heal()
    assert uploader.read_pointer() == ("ckpt-1", ["ckpt-1"])
    assert uploader.latest_complete() == "ckpt-1"
    assert "ckpt-2" not in [i.name for i in uploader.list_checkpoints()
                            if i.complete]
    # Once the network is back, the next attempt completes the mirror.
    uploader.mirror(local_ckpts.dir, "ckpt-2", ["ckpt-1", "ckpt-2"])
    assert uploader.read_pointer() == ("ckpt-2", ["ckpt-1", "ckpt-2"])


def test_a_store_lacking_a_primitive_cannot_be_built():
    # The primitives are the whole contract: a store without conditional
    # writes (or any other primitive) fails when it is built, naming what
    # it lacks, instead of silently losing the writer lease later.
    class NoConditionalWrites(LocalStore):
        _read_versioned = Store._read_versioned
        _write_if = Store._write_if

    with pytest.raises(TypeError, match="_read_versioned, _write_if"):
        NoConditionalWrites("file:///tmp/x")
    # `Uploader`, the older name, is the same class.
    assert Uploader is Store


def test_endpoint_credentials_are_never_echoed(s3_url, monkeypatch):
    """An S3 endpoint URL with `user:password@` (a MinIO habit) appeared in
    the hint and in the SDK's cause of a StorageError."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://user:s3cret@127.0.0.1:9")
    with pytest.raises(StorageError) as error:
        get_uploader(s3_url, retries=0, timeout=2, check_timeout=2).check()
    message = str(error.value)
    assert "s3cret" not in message and "user:" not in message
    assert "http://***@127.0.0.1:9" in message


def test_deeply_nested_upload_options_are_a_clear_error(monkeypatch):
    """Deeply nested JSON in KERAS_CKPT_UPLOAD_OPTIONS gave an uncaught
    RecursionError."""
    nested = '{"a": ' + "[" * 20000 + "]" * 20000 + "}"
    monkeypatch.setenv("KERAS_CKPT_UPLOAD_OPTIONS", nested)
    with pytest.raises(ValueError, match="KERAS_CKPT_UPLOAD_OPTIONS: nested "
                                         "too deeply"):
        get_uploader("file:///tmp/x")
