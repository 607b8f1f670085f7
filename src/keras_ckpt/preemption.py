"""Preemption handling: notice a pending shutdown and time the grace budget.

`PreemptionHandler` is the internal piece `keras_ckpt.Checkpoint` uses for
`on_preemption="exit"|"stop"`. It learns of a pending shutdown from

- SIGTERM, which every platform sends before killing the process (Kubernetes,
  SageMaker, Vertex AI, Azure ML, Slurm, `docker stop`, a GCE/EC2 shutdown);
- optionally, the cloud's preemption notice on the instance metadata server,
  which can arrive before the SIGTERM does (GCE `instance/preempted`, EC2
  `spot/instance-action`, Azure Scheduled Events `Preempt`).

It only records *that* a shutdown was requested and *by when* the work must
be done (`deadline`); the callback checks `requested` at each batch boundary,
saves, and flushes the mirror within `remaining()` seconds.

Grace windows: AWS gives 120 s between the spot interruption notice and the
stop; GCP Spot/preemptible VMs and Azure Spot VMs about 30 s. The default
budget of 25 s fits all three with room for the process to exit.
"""

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings

logger = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 25.0
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_REQUEST_TIMEOUT = 1.0

WATCHERS = ("gce", "ec2", "azure")

# Base URLs of the metadata servers; each can be pointed elsewhere (tests, a
# proxy) by its environment variable or the matching constructor argument.
GCE_METADATA_URL = "http://metadata.google.internal"
EC2_METADATA_URL = "http://169.254.169.254"
AZURE_METADATA_URL = "http://169.254.169.254"
_URL_ENV = {
    "gce": ("KERAS_CKPT_GCE_METADATA_URL", GCE_METADATA_URL),
    "ec2": ("KERAS_CKPT_EC2_METADATA_URL", EC2_METADATA_URL),
    "azure": ("KERAS_CKPT_AZURE_METADATA_URL", AZURE_METADATA_URL),
}

REASON_SIGTERM = "SIGTERM"
REASON_GCE = "gce-preempted"
REASON_EC2 = "ec2-spot-interruption"
REASON_AZURE = "azure-scheduled-event-preempt"

_EC2_TOKEN_TTL_SECONDS = 21600
_AZURE_API_VERSION = "2020-07-01"
_AZURE_INSTANCE_API_VERSION = "2021-02-01"
# Azure enables Scheduled Events on the first request, which can take up to
# two minutes to answer; later requests answer at once.
_AZURE_FIRST_REQUEST_TIMEOUT = 120.0

# Metadata servers are link-local: never send these requests through an
# HTTP(S)_PROXY from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PreemptionHandler:
    """Notices a pending shutdown (SIGTERM or a cloud notice) and times it.

    The SIGTERM handler only sets a flag and records the time: no I/O, no
    locks, no logging, so it is safe whatever the training thread was doing
    when the signal arrived. A handler installed earlier at the Python level
    (by the user, a framework, or the platform's launcher) is chained: it is
    called after ours, so both see the signal. `SIG_DFL` and `SIG_IGN` are
    not called: the default action would kill the process before the
    checkpoint is saved, which is the point of handling the signal.

    Python runs signal handlers on the main thread only, so `install()`
    must be called from the main thread. From another thread it warns and
    leaves SIGTERM alone (the metadata watchers, which need no signal, still
    start).

    Args:
        grace_seconds: float, seconds allowed from the notice until the save
            and upload must be finished. Defaults to `25.0` (GCP and Azure
            give about 30 s, AWS 120 s).
        watch: which cloud preemption notices to poll for: `None` or `()`
            for none, `"auto"` for all of `"gce"`, `"ec2"`, `"azure"`, or a
            tuple of those names. A watcher whose metadata server cannot be
            reached stays quiet. Defaults to `None`.
        poll_interval: float, seconds between two polls of a metadata
            server. Defaults to `5.0`.
        request_timeout: float, timeout of each metadata request in seconds.
            Defaults to `1.0`.
        gce_metadata_url: str, base URL of the GCE metadata server. Defaults
            to `$KERAS_CKPT_GCE_METADATA_URL`, else
            `"http://metadata.google.internal"`.
        ec2_metadata_url: str, base URL of the EC2 instance metadata
            service. Defaults to `$KERAS_CKPT_EC2_METADATA_URL`, else
            `"http://169.254.169.254"`.
        azure_metadata_url: str, base URL of the Azure instance metadata
            service. Defaults to `$KERAS_CKPT_AZURE_METADATA_URL`, else
            `"http://169.254.169.254"`.

    Example:

    ```python
    handler = PreemptionHandler(grace_seconds=25, watch="auto")
    handler.install()
    try:
        for batch in batches:
            train_step(batch)
            if handler.requested:
                save_checkpoint()
                flush_uploads(timeout=handler.remaining())
                break
    finally:
        handler.uninstall()
    ```
    """

    def __init__(
        self,
        grace_seconds=DEFAULT_GRACE_SECONDS,
        watch=None,
        poll_interval=DEFAULT_POLL_INTERVAL,
        request_timeout=DEFAULT_REQUEST_TIMEOUT,
        gce_metadata_url=None,
        ec2_metadata_url=None,
        azure_metadata_url=None,
        exit_code_at_deadline=None,
        describe_unfinished=None,
    ):
        if (
            isinstance(grace_seconds, bool)
            or not isinstance(grace_seconds, (int, float))
            or not grace_seconds > 0
        ):
            raise ValueError(
                "Invalid value for argument `grace_seconds`. "
                f"Received: grace_seconds={grace_seconds!r}. "
                "Expected a positive number of seconds."
            )
        for arg, value in (("poll_interval", poll_interval),
                           ("request_timeout", request_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"Invalid value for argument `{arg}`. "
                    f"Received: {arg}={value!r}. Expected a positive number of seconds."
                )
        self.grace_seconds = float(grace_seconds)
        self.watch = validate_watch(watch)
        self.poll_interval = float(poll_interval)
        self.request_timeout = float(request_timeout)
        given = {"gce": gce_metadata_url, "ec2": ec2_metadata_url,
                 "azure": azure_metadata_url}
        self._urls = {}
        for name, (env_key, default) in _URL_ENV.items():
            url = given[name] or os.environ.get(env_key) or default
            self._urls[name] = url.rstrip("/")

        # A process stuck where no batch boundary comes (a hung input
        # pipeline, a collective waiting for a dead peer) must still end
        # within the budget, as the platform would end it anyway.
        self.exit_code_at_deadline = exit_code_at_deadline
        # () -> str or None: what is not saved or mirrored yet, for the one
        # line logged when the deadline ends the process.
        self.describe_unfinished = describe_unfinished

        self._requested = False
        self._reason = None
        self._request_time = None
        self._deadline = None

        self._installed = False
        self._active = False
        self._previous = None
        self._stop = threading.Event()
        self._threads = []

    # --- state ---------------------------------------------------------

    @property
    def requested(self):
        """bool, whether a shutdown was requested."""
        return self._requested

    @property
    def reason(self):
        """str or None: `"SIGTERM"`, `"gce-preempted"`,
        `"ec2-spot-interruption"` or `"azure-scheduled-event-preempt"`."""
        return self._reason

    @property
    def request_time(self):
        """float or None, `time.monotonic()` when the request was noticed."""
        return self._request_time

    @property
    def deadline(self):
        """float or None, `time.monotonic()` by which saving must be done:
        the notice time plus `grace_seconds`, earlier if the cloud's notice
        names an earlier termination time."""
        return self._deadline

    def remaining(self):
        """Seconds left until `deadline` (never negative), or None if no
        shutdown was requested."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def request(self, reason, not_after=None):
        """Records a shutdown request.

        The first request sets `reason` and the time; a later one can only
        bring the deadline forward. Called by the SIGTERM handler and the
        watchers, and usable by code that learns of a shutdown another way.

        Args:
            reason: str, why the shutdown was requested.
            not_after: float or None, `time.monotonic()` value the platform
                announced as the termination time, if any.
        """
        # Runs inside the signal handler: plain attribute writes only.
        now = time.monotonic()
        deadline = now + self.grace_seconds
        if not_after is not None:
            deadline = min(deadline, not_after)
        if not self._requested:
            self._reason = reason
            self._request_time = now
            self._deadline = deadline
            self._requested = True
        elif self._deadline is None or deadline < self._deadline:
            self._deadline = deadline

    # --- install / uninstall ------------------------------------------

    def install(self):
        """Installs the SIGTERM handler and starts the watchers.

        Idempotent. Returns True if the SIGTERM handler is installed, False
        if it could not be (not on the main thread).
        """
        if self._installed:
            return self._active
        self._installed = True
        # A fresh event per install: a watcher of an earlier install still
        # stuck in a request must not resume polling.
        self._stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handle_signal)
            self._active = True
        else:
            warnings.warn(
                "keras_ckpt could not install its SIGTERM handler: Python "
                "delivers signals to the main thread only, and "
                f"install() ran on thread {threading.current_thread().name!r}. "
                "A preemption will not be saved unless a metadata watcher "
                "notices it (`watch=`); run `fit()` on the main thread.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._start_watchers()
        if self.exit_code_at_deadline is not None:
            self._start_deadline_watchdog()
        return self._active

    def uninstall(self):
        """Restores the previous SIGTERM handler and stops the watchers.

        If another handler replaced ours since `install()`, it is left in
        place (ours then only forwards to the handler it replaced).
        """
        if not self._installed:
            return
        self._installed = False
        self._stop.set()
        for thread in self._threads:
            # Watchers are daemon threads; a request stuck in its timeout
            # must not hold up the end of training.
            thread.join(timeout=0.1)
        self._threads = []
        if self._active and threading.current_thread() is threading.main_thread():
            self._active = False
            if signal.getsignal(signal.SIGTERM) == self._handle_signal:
                previous = self._previous if self._previous is not None else signal.SIG_DFL
                signal.signal(signal.SIGTERM, previous)
                self._previous = None
        elif self._active:
            self._active = False

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc_info):
        self.uninstall()

    def _start_deadline_watchdog(self):
        stop = self._stop

        def watchdog():
            while not stop.wait(0.2):
                deadline = self._deadline
                if deadline is not None and time.monotonic() >= deadline:
                    sys.stderr.write(self._deadline_message())
                    sys.stderr.flush()
                    os._exit(self.exit_code_at_deadline)

        thread = threading.Thread(target=watchdog, daemon=True,
                                  name="keras_ckpt-preemption-deadline")
        thread.start()
        self._threads.append(thread)

    def _deadline_message(self):
        """The one line written when the budget ends the process."""
        unfinished = None
        if self.describe_unfinished is not None:
            try:
                unfinished = self.describe_unfinished()
            except Exception as e:  # the exit must happen regardless
                unfinished = f"(could not tell what is unfinished: {e!r})"
        if unfinished is None:
            return (
                f"keras_ckpt: the {self.grace_seconds:g} s preemption budget "
                "ran out before training reached a batch boundary; exiting "
                f"now ({self.exit_code_at_deadline}). The last committed "
                "checkpoint is intact.\n"
            )
        return (
            f"keras_ckpt: the {self.grace_seconds:g} s preemption budget ran "
            f"out; exiting now ({self.exit_code_at_deadline}). The last "
            f"committed checkpoints are intact; {unfinished}.\n"
        )

    def _handle_signal(self, signum, frame):
        if self._active:
            self.request(REASON_SIGTERM)
        previous = self._previous
        if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            previous(signum, frame)

    # --- watchers ------------------------------------------------------

    def _start_watchers(self):
        checks = {
            "gce": _GceWatcher,
            "ec2": _Ec2Watcher,
            "azure": _AzureWatcher,
        }
        for name in self.watch:
            watcher = checks[name](self._urls[name], self.request_timeout)
            thread = threading.Thread(
                target=self._poll,
                args=(watcher, self._stop),
                name=f"keras_ckpt-preemption-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _poll(self, watcher, stop):
        failed_before = False
        while not stop.is_set() and not self._requested:
            try:
                notice = watcher.check()
            except Exception as e:  # noqa: BLE001 - a watcher never stops training.
                if not failed_before:
                    logger.debug(
                        "Preemption watcher %r cannot read %s (%s); it will keep "
                        "trying quietly.", watcher.name, watcher.base_url, e,
                    )
                    failed_before = True
            else:
                if notice is not None:
                    reason, not_after = notice
                    if stop.is_set():
                        return
                    self.request(reason, not_after=not_after)
                    logger.warning(
                        "Preemption notice from %s (%s): saving at the next "
                        "batch boundary, %.0f s budget.",
                        watcher.base_url, reason, self.remaining() or 0.0,
                    )
                    return
            stop.wait(self.poll_interval)


def validate_watch(watch, arg_name="watch"):
    """Returns `watch` as a tuple of watcher names.

    Raises a Keras-style ValueError naming `arg_name` if `watch` is not
    valid, so a caller can check its own argument (e.g. `preemption_watch`)
    in its constructor, before `fit()` starts.
    """
    if watch is None or watch is False:
        return ()
    if watch == "auto":
        return WATCHERS
    try:
        names = (watch,) if isinstance(watch, str) else tuple(watch)
    except TypeError:
        names = None
    if names is None or any(name not in WATCHERS for name in names):
        raise ValueError(
            f"Invalid value for argument `{arg_name}`. "
            f"Received: {arg_name}={watch!r}. Expected None, \"auto\", or a "
            f"tuple of names from {WATCHERS}."
        )
    return tuple(dict.fromkeys(names))


class _MetadataError(OSError):
    """A metadata server is unreachable or does not look like the real one."""


def _http(method, url, headers, timeout, data=None):
    """Returns (status, headers, body); HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def _monotonic_from_utc(when):
    """Converts an absolute UTC time to a `time.monotonic()` value."""
    now_utc = datetime.datetime.now(datetime.timezone.utc)
    return time.monotonic() + (when - now_utc).total_seconds()


def _parse_utc(text):
    if not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:  # Azure: "Mon, 19 Sep 2016 18:29:47 GMT"
            value = datetime.datetime.strptime(text, "%a, %d %b %Y %H:%M:%S %Z")
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


class _GceWatcher:
    """GCE: `instance/preempted` reads "TRUE" once the VM is being preempted."""

    name = "gce"

    def __init__(self, base_url, timeout):
        self.base_url = base_url
        self.timeout = timeout

    def check(self):
        status, headers, body = _http(
            "GET",
            self.base_url + "/computeMetadata/v1/instance/preempted",
            {"Metadata-Flavor": "Google"},
            self.timeout,
        )
        if status != 200 or headers.get("Metadata-Flavor") != "Google":
            raise _MetadataError(f"not a GCE metadata server (HTTP {status})")
        if body.strip().upper() == b"TRUE":
            return REASON_GCE, None
        return None


class _Ec2Watcher:
    """EC2 (IMDSv2): `spot/instance-action` is 404 until an interruption,
    then JSON like `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`."""

    name = "ec2"

    def __init__(self, base_url, timeout):
        self.base_url = base_url
        self.timeout = timeout
        self._token = None
        self._token_expiry = 0.0

    def _get_token(self):
        if self._token is None or time.monotonic() > self._token_expiry:
            status, _, body = _http(
                "PUT",
                self.base_url + "/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": str(_EC2_TOKEN_TTL_SECONDS)},
                self.timeout,
                data=b"",
            )
            if status != 200 or not body:
                raise _MetadataError(f"no IMDSv2 token (HTTP {status})")
            self._token = body.decode().strip()
            self._token_expiry = time.monotonic() + _EC2_TOKEN_TTL_SECONDS - 60
        return self._token

    def check(self):
        for attempt in range(2):
            status, _, body = _http(
                "GET",
                self.base_url + "/latest/meta-data/spot/instance-action",
                {"X-aws-ec2-metadata-token": self._get_token()},
                self.timeout,
            )
            if status == 401 and attempt == 0:  # Token expired or revoked.
                self._token = None
                continue
            break
        if status == 404:
            return None
        if status != 200:
            raise _MetadataError(f"unexpected HTTP {status} from instance-action")
        try:
            action = json.loads(body)
        except ValueError:
            raise _MetadataError("instance-action is not JSON") from None
        if not isinstance(action, dict) or "action" not in action:
            raise _MetadataError(f"unexpected instance-action {action!r}")
        when = _parse_utc(action.get("time"))
        return REASON_EC2, (_monotonic_from_utc(when) if when else None)


class _AzureWatcher:
    """Azure: Scheduled Events lists a `Preempt` event for a Spot VM about to
    be evicted (at least 30 s ahead, `NotBefore`)."""

    name = "azure"
    _HEADERS = {"Metadata": "true"}

    def __init__(self, base_url, timeout):
        self.base_url = base_url
        self.timeout = timeout
        self._first = True
        self._vm_name = None

    def _instance_name(self):
        # Scheduled Events shows the events of every VM in the availability
        # set / scale set; only ours matter.
        if self._vm_name is None:
            status, _, body = _http(
                "GET",
                self.base_url + "/metadata/instance/compute/name"
                f"?api-version={_AZURE_INSTANCE_API_VERSION}&format=text",
                self._HEADERS,
                self.timeout,
            )
            self._vm_name = body.decode().strip() if status == 200 else ""
        return self._vm_name

    def check(self):
        timeout = max(self.timeout, _AZURE_FIRST_REQUEST_TIMEOUT) if self._first else self.timeout
        status, _, body = _http(
            "GET",
            self.base_url + f"/metadata/scheduledevents?api-version={_AZURE_API_VERSION}",
            self._HEADERS,
            timeout,
        )
        if status != 200:
            raise _MetadataError(f"not an Azure metadata service (HTTP {status})")
        self._first = False
        try:
            document = json.loads(body)
            events = document.get("Events") or []
        except (ValueError, AttributeError):
            raise _MetadataError("scheduled events are not JSON") from None
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            name = self._instance_name() if resources else ""
            if resources and name and name not in resources:
                continue
            when = _parse_utc(event.get("NotBefore"))
            return REASON_AZURE, (_monotonic_from_utc(when) if when else None)
        return None
