"""Tests for keras_ckpt.preemption: SIGTERM handling and cloud notice watchers.

The watchers talk to a local HTTP server that imitates the GCE metadata
server, EC2 IMDSv2 (token dance included) and Azure Scheduled Events, and
refuses requests that lack the headers the real services require.
"""

import datetime
import http.server
import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from keras_ckpt import preemption
from keras_ckpt.preemption import PreemptionHandler

FAST = dict(poll_interval=0.05, request_timeout=1.0)


class FakeMetadata:
    """State of the imitated metadata servers, changed by the tests."""

    def __init__(self):
        self.gce_preempted = False
        self.ec2_action = None  # dict -> served as JSON with 200
        self.ec2_tokens = set()
        self.azure_events = []
        self.azure_vm_name = "vm-self"
        self.requests = []  # (method, path, headers)
        self.lock = threading.Lock()


def _make_handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body=b"", headers=None):
            body = body if isinstance(body, bytes) else body.encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _record(self):
            with state.lock:
                state.requests.append((self.command, self.path, self.headers))

        def do_PUT(self):
            self._record()
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path != "/latest/api/token":
                return self._send(404)
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self._send(400, "missing TTL header")
            token = f"token-{len(state.ec2_tokens)}"
            state.ec2_tokens.add(token)
            self._send(200, token)

        def do_GET(self):
            self._record()
            path = self.path
            if path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header.")
                body = "TRUE" if state.gce_preempted else "FALSE"
                return self._send(200, body, {"Metadata-Flavor": "Google"})
            if path == "/latest/meta-data/spot/instance-action":
                if self.headers.get("X-aws-ec2-metadata-token") not in state.ec2_tokens:
                    return self._send(401)
                if state.ec2_action is None:
                    return self._send(404, "Not Found")
                return self._send(200, json.dumps(state.ec2_action))
            if path.startswith("/metadata/"):
                if self.headers.get("Metadata") != "true":
                    return self._send(400, json.dumps({"error": "Bad request"}))
                if path == "/metadata/scheduledevents?api-version=2020-07-01":
                    doc = {"DocumentIncarnation": len(state.azure_events),
                           "Events": state.azure_events}
                    return self._send(200, json.dumps(doc))
                if path.startswith("/metadata/instance/compute/name?"):
                    return self._send(200, state.azure_vm_name)
            self._send(404)

    return Handler


@pytest.fixture
def metadata():
    state = FakeMetadata()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def n_requests(state, path_prefix):
    with state.lock:
        return sum(1 for _, path, _ in state.requests if path.startswith(path_prefix))


def utc_in(seconds):
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- watchers ------------------------------------------------------------


def test_gce_watcher_triggers_on_preempted_true(metadata):
    handler = PreemptionHandler(grace_seconds=20, watch=("gce",),
                                gce_metadata_url=metadata.url, **FAST)
    with handler:
        assert wait_for(lambda: n_requests(metadata, "/computeMetadata") >= 3)
        assert not handler.requested
        metadata.gce_preempted = True
        assert wait_for(lambda: handler.requested)
    assert handler.reason == "gce-preempted"
    assert 15 < handler.remaining() <= 20
    _, _, headers = metadata.requests[-1]
    assert headers["Metadata-Flavor"] == "Google"


def test_ec2_watcher_does_the_imdsv2_token_dance(metadata):
    handler = PreemptionHandler(grace_seconds=25, watch=("ec2",),
                                ec2_metadata_url=metadata.url, **FAST)
    with handler:
        assert wait_for(lambda: n_requests(metadata, "/latest/meta-data") >= 3)
        assert not handler.requested  # 404 means no interruption
        # One token, reused for every poll.
        assert n_requests(metadata, "/latest/api/token") == 1
        put = next(r for r in metadata.requests if r[0] == "PUT")
        assert int(put[2]["X-aws-ec2-metadata-token-ttl-seconds"]) > 0
        # A revoked token is replaced on the next poll (401 -> new PUT).
        metadata.ec2_tokens.clear()
        assert wait_for(lambda: n_requests(metadata, "/latest/api/token") >= 2)
        metadata.ec2_action = {"action": "terminate", "time": utc_in(120)}
        assert wait_for(lambda: handler.requested)
    assert handler.reason == "ec2-spot-interruption"
    assert 20 < handler.remaining() <= 25  # 120 s notice: the budget decides


def test_ec2_notice_time_earlier_than_budget_brings_deadline_forward(metadata):
    metadata.ec2_action = {"action": "stop", "time": utc_in(6)}
    handler = PreemptionHandler(grace_seconds=25, watch=("ec2",),
                                ec2_metadata_url=metadata.url, **FAST)
    with handler:
        assert wait_for(lambda: handler.requested)
    assert handler.remaining() < 7


def test_azure_watcher_triggers_on_preempt_event_for_this_vm(metadata):
    handler = PreemptionHandler(grace_seconds=25, watch=("azure",),
                                azure_metadata_url=metadata.url, **FAST)
    with handler:
        metadata.azure_events = [
            {"EventId": "1", "EventType": "Reboot", "ResourceType": "VirtualMachine",
             "Resources": ["vm-self"], "EventStatus": "Scheduled", "NotBefore": ""},
            {"EventId": "2", "EventType": "Preempt", "ResourceType": "VirtualMachine",
             "Resources": ["vm-other"], "EventStatus": "Scheduled", "NotBefore": ""},
        ]
        assert wait_for(lambda: n_requests(metadata, "/metadata/scheduledevents") >= 3)
        assert not handler.requested  # a reboot, and another VM's eviction
        not_before = (datetime.datetime.now(datetime.timezone.utc)
                      + datetime.timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
        metadata.azure_events.append(
            {"EventId": "3", "EventType": "Preempt", "ResourceType": "VirtualMachine",
             "Resources": ["vm-self"], "EventStatus": "Scheduled", "NotBefore": not_before})
        assert wait_for(lambda: handler.requested)
    assert handler.reason == "azure-scheduled-event-preempt"
    assert 20 < handler.remaining() <= 25
    assert all(h.get("Metadata") == "true" for _, p, h in metadata.requests)


def test_watcher_urls_come_from_environment(metadata, monkeypatch):
    monkeypatch.setenv("KERAS_CKPT_GCE_METADATA_URL", metadata.url)
    metadata.gce_preempted = True
    with PreemptionHandler(watch="gce", **FAST) as handler:
        assert wait_for(lambda: handler.requested)
    assert handler.reason == "gce-preempted"


def test_watchers_bypass_http_proxy(metadata, monkeypatch, closed_port_url):
    monkeypatch.setenv("http_proxy", closed_port_url)
    monkeypatch.setenv("HTTP_PROXY", closed_port_url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    metadata.gce_preempted = True
    with PreemptionHandler(watch=("gce",), gce_metadata_url=metadata.url, **FAST) as handler:
        assert wait_for(lambda: handler.requested)


def test_unreachable_endpoints_are_harmless(closed_port_url, caplog):
    caplog.set_level(logging.DEBUG, logger="keras_ckpt.preemption")
    handler = PreemptionHandler(
        watch="auto", gce_metadata_url=closed_port_url,
        ec2_metadata_url=closed_port_url, azure_metadata_url=closed_port_url, **FAST)
    with handler:
        time.sleep(0.5)  # about ten polls each
        assert all(t.is_alive() for t in handler._threads)
        assert not handler.requested
    assert handler.reason is None and handler.remaining() is None
    records = [r for r in caplog.records if r.name == "keras_ckpt.preemption"]
    messages = [r.getMessage() for r in records]
    for name in ("gce", "ec2", "azure"):
        # Logged once at debug, not at every poll.
        assert sum(f"watcher '{name}'" in m for m in messages) == 1
    assert all(r.levelno == logging.DEBUG for r in records)


def test_wrong_servers_are_harmless(metadata):
    # Every endpoint on a server that is not the right cloud's: 404 / 400.
    handler = PreemptionHandler(
        watch="auto", gce_metadata_url=metadata.url + "/nope",
        ec2_metadata_url=metadata.url + "/nope", azure_metadata_url=metadata.url + "/nope",
        **FAST)
    with handler:
        time.sleep(0.3)
        assert not handler.requested


def test_uninstall_stops_watchers(metadata):
    handler = PreemptionHandler(watch=("gce",), gce_metadata_url=metadata.url, **FAST)
    handler.install()
    assert wait_for(lambda: n_requests(metadata, "/computeMetadata") >= 1)
    threads = list(handler._threads)
    handler.uninstall()
    assert wait_for(lambda: not any(t.is_alive() for t in threads), timeout=2)
    metadata.gce_preempted = True
    time.sleep(0.2)
    assert not handler.requested


# --- arguments and request() ----------------------------------------------


@pytest.mark.parametrize("watch", ["gcp", ("gce", "aws"), 3])
def test_invalid_watch_names_the_argument(watch):
    with pytest.raises(ValueError, match="argument `watch`"):
        PreemptionHandler(watch=watch)


@pytest.mark.parametrize("arg", ["grace_seconds", "poll_interval", "request_timeout"])
@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_invalid_durations_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=f"argument `{arg}`"):
        PreemptionHandler(**{arg: value})


def test_validate_watch_names_the_callers_argument():
    with pytest.raises(ValueError, match=r"argument `preemption_watch`. Received: preemption_watch='gcp'"):
        preemption.validate_watch("gcp", "preemption_watch")


def test_watch_auto_and_none():
    assert PreemptionHandler(watch="auto").watch == ("gce", "ec2", "azure")
    assert PreemptionHandler(watch=None).watch == ()
    assert PreemptionHandler(watch=["ec2", "ec2"]).watch == ("ec2",)


def test_first_request_wins_and_deadline_only_moves_forward():
    handler = PreemptionHandler(grace_seconds=30)
    assert not handler.requested and handler.remaining() is None
    handler.request("SIGTERM")
    first_deadline = handler.deadline
    assert handler.requested and handler.reason == "SIGTERM"
    handler.request("gce-preempted", not_after=time.monotonic() + 5)
    assert handler.reason == "SIGTERM"
    assert handler.deadline < first_deadline
    later = handler.deadline
    handler.request("SIGTERM")
    assert handler.deadline == later


def test_install_off_main_thread_warns_and_leaves_sigterm_alone():
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler()
    result = {}

    def run():
        with pytest.warns(RuntimeWarning, match="main thread"):
            result["installed"] = handler.install()
        handler.uninstall()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result["installed"] is False
    assert signal.getsignal(signal.SIGTERM) is before


# --- SIGTERM, in a subprocess so the test runner's handlers stay intact ---


# The child loads preemption.py by path: it imports nothing else from
# keras_ckpt, and skipping the package's __init__ (TensorFlow) keeps these
# tests fast.
_LOAD_PREEMPTION = f"""
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("keras_ckpt_preemption", {preemption.__file__!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
PreemptionHandler = _module.PreemptionHandler
"""


def run_script(body):
    script = _LOAD_PREEMPTION + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=60)


def test_sigterm_sets_flag_and_chains_previous_handler():
    proc = run_script("""
        import json, os, signal, time

        calls = []
        def previous(signum, frame):
            calls.append(signum)
        signal.signal(signal.SIGTERM, previous)

        handler = PreemptionHandler(grace_seconds=12)
        installed = handler.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # Python runs the handler at the next bytecode boundary.
        out = dict(installed=installed, requested=handler.requested,
                   reason=handler.reason, chained=list(calls),
                   remaining=handler.remaining())
        handler.uninstall()
        out["restored"] = signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        out["calls_after_uninstall"] = len(calls)
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["installed"] and out["requested"]
    assert out["reason"] == "SIGTERM"
    assert out["chained"] == [signal.SIGTERM]
    assert 11 < out["remaining"] <= 12
    assert out["restored"]
    assert out["calls_after_uninstall"] == 2


def test_sigterm_with_default_action_does_not_kill_until_uninstalled():
    proc = run_script("""
        import os, signal, sys, time

        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        handler = PreemptionHandler()
        handler.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("survived", handler.requested, flush=True)
        handler.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached", flush=True)
    """)
    assert proc.stdout.strip() == "survived True", proc.stderr
    assert proc.returncode == -signal.SIGTERM


def test_sig_ign_previous_is_restored_not_called():
    proc = run_script("""
        import os, signal, time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        handler = PreemptionHandler()
        handler.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        handler.uninstall()
        print(handler.requested, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_uninstall_keeps_a_handler_installed_after_ours():
    proc = run_script("""
        import os, signal, time

        seen = []
        def first(signum, frame):
            seen.append("first")
        signal.signal(signal.SIGTERM, first)
        handler = PreemptionHandler()
        handler.install()
        ours = signal.getsignal(signal.SIGTERM)
        def later(signum, frame):
            seen.append("later")
            ours(signum, frame)
        signal.signal(signal.SIGTERM, later)
        handler.uninstall()
        kept = signal.getsignal(signal.SIGTERM) is later
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print(kept, handler.requested, ",".join(seen))
    """)
    assert proc.returncode == 0, proc.stderr
    # Ours is inactive after uninstall but still forwards to `first`.
    assert proc.stdout.split() == ["True", "False", "later,first"]


def test_a_stuck_process_still_exits_at_the_deadline():
    """SIGTERM while no batch boundary comes: exit 143 when the budget ends."""
    start = time.monotonic()
    result = run_script("""
        import os, signal, time
        handler = PreemptionHandler(grace_seconds=0.5, exit_code_at_deadline=143)
        handler.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a hung input pipeline: never reaches a boundary
        sys.exit(0)
    """)
    elapsed = time.monotonic() - start
    assert result.returncode == 143, result.stderr
    assert "budget ran out" in result.stderr
    assert elapsed < 20
