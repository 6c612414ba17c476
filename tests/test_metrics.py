"""Prometheus metrics: the status as exposition text, the endpoint the admin child serves
(metrics.listen), and ``chatctl metrics``. Real daemons, real HTTP over 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import CHATD, UdpUser, children_of, wait_for
from prometheus_client.parser import text_string_to_metric_families

from chatd import metrics_http
from chatd.metrics import render

CHATCTL = [sys.executable, "-m", "chatd.cli.chatctl"]
# urllib follows http_proxy; a scrape of 127.0.0.1 must not
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_tcp_port() -> int:
    """A free TCP port below the ephemeral range (see helpers.free_udp_port for why)."""
    for _ in range(1000):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free TCP port found")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(text: str) -> dict[str, str]:
    """Family name -> type."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def scrape(port: int, path: str = "/metrics", timeout: float = 10.0) -> str:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.read().decode()


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


# -- the status as text (pure) ------------------------------------------------------------

STATUS = {
    "pid": 4242, "address": "127.0.0.1:8888", "uptime": 12.5, "started": "2026-01-02T03:04:05Z",
    "users": 3, "max_users": 1000, "config": None,
    "counters": {"datagrams_in": 100, "datagrams_out": 250, "chat_lines": 7, "loop_stalls": 1,
                 "evicted_idle": 2, "brand_new_thing": 5, "odd-name.x": 1},
    "drops": {"no_session": 4, "bad_utf8": 1},
    "send_errors": {"ECONNREFUSED": 3, "backlog_full": 2},
    "kernel_drops": 9, "backlog": 11, "plugins": ["who", "me"], "log_write_errors": 6,
    "admin_child_pid": 4243, "admin_child_restarts": 2,
    "cluster": {"node": "n1", "room": "main", "redis_connected": False, "reconnects": 4,
                "published": 50, "received": 60, "outbox": 8, "dropped_outbox": 1, "gaps": 0,
                "lag_seconds": 0.25, "users": 42,
                "nodes": {"n1": {"alive": True}, "n2": {"alive": True}, "n3": {"alive": False}}},
}


def test_status_with_a_cluster_section_maps_to_prometheus_names():
    text = render(STATUS, process=False).decode()
    got = samples(text)
    expected = {
        ("chatd_users", ()): 3, ("chatd_max_users", ()): 1000,
        ("chatd_uptime_seconds", ()): 12.5,
        ("chatd_start_time_seconds", ()): 1767323045,
        ("chatd_backlog_datagrams", ()): 11,
        ("chatd_datagrams_received_total", ()): 100, ("chatd_datagrams_sent_total", ()): 250,
        ("chatd_chat_lines_total", ()): 7, ("chatd_loop_stalls_total", ()): 1,
        ("chatd_internal_errors_total", ()): 0,  # known, not counted yet: 0, not absent
        ("chatd_evicted_idle_total", ()): 2,
        ("chatd_brand_new_thing_total", ()): 5,  # a counter nobody named: still exported
        ("chatd_odd_name_x_total", ()): 1,
        ("chatd_dropped_datagrams_total", (("reason", "no_session"),)): 4,
        ("chatd_dropped_datagrams_total", (("reason", "bad_utf8"),)): 1,
        ("chatd_send_errors_total", (("errno", "ECONNREFUSED"),)): 3,
        ("chatd_send_errors_total", (("errno", "backlog_full"),)): 2,
        ("chatd_kernel_drops_total", ()): 9, ("chatd_log_write_errors_total", ()): 6,
        ("chatd_admin_child_restarts_total", ()): 2,
        ("chatd_plugin_enabled", (("plugin", "who"),)): 1,
        ("chatd_build_info", (("version", __import__("chatd").__version__),)): 1,
        ("chatd_cluster_info", (("node", "n1"), ("room", "main"))): 1,
        ("chatd_cluster_redis_connected", ()): 0,
        ("chatd_cluster_redis_reconnects_total", ()): 4,
        ("chatd_cluster_records_published_total", ()): 50,
        ("chatd_cluster_records_received_total", ()): 60,
        ("chatd_cluster_outbox_records", ()): 8,
        ("chatd_cluster_outbox_dropped_records_total", ()): 1,
        ("chatd_cluster_stream_gaps_total", ()): 0,
        ("chatd_cluster_lag_seconds", ()): 0.25,
        ("chatd_cluster_nodes_alive", ()): 2,
        ("chatd_cluster_node_up", (("node", "n3"),)): 0,
        ("chatd_cluster_users", ()): 42,
    }
    for key, want in expected.items():
        assert got.get(key) == want, (key, got.get(key))
    types = families(text)
    assert types["chatd_cluster_redis_reconnects"] == "counter"
    assert types["chatd_cluster_lag_seconds"] == "gauge"
    assert types["chatd_users"] == "gauge"
    assert not any(name.startswith("process_") for name in types)  # process=False


def test_a_status_without_cluster_or_with_odd_values_still_renders():
    """An older or newer daemon: keys missing, None where a number was, a lag not known yet."""
    status = {"pid": os.getpid(), "users": 1, "kernel_drops": None, "counters": "junk",
              "cluster": {"redis_connected": True, "lag_seconds": None,
                          "nodes": {"n1": {"alive": True}}, "nodes_alive": 1}}
    text = render(status).decode()
    types = families(text)
    assert "chatd_kernel_drops" not in types and "chatd_cluster_lag_seconds" not in types
    assert value(text, "chatd_cluster_nodes_alive") == 1
    assert value(text, "chatd_datagrams_received_total") == 0
    assert value(text, "process_resident_memory_bytes") > 0  # this test process's own
    assert "chatd_cluster_info" not in families(render({"users": 1}).decode())


# -- the endpoint ---------------------------------------------------------------------------


@pytest.fixture
def metered(make_chatd):
    """A chatd serving metrics on a free port; (server, port)."""
    port = free_tcp_port()
    server = make_chatd({"metrics": {"listen": f"127.0.0.1:{port}"}})
    return server, port


def test_scrape_follows_real_traffic(metered):
    server, port = metered
    before = scrape(port)
    assert value(before, "chatd_users") == 0
    received = value(before, "chatd_datagrams_received_total")
    alice, bob = UdpUser(server.addr).join("alice"), UdpUser(server.addr).join("bob")
    try:
        alice.say("hello")
        assert b"hello" in bob.recv()
        bob.ping()

        def moved():
            text = scrape(port)
            return text if value(text, "chatd_users") == 2 else None

        after = wait_for(moved, timeout=15, interval=0.3, what="chatd_users 2")
        assert value(after, "chatd_datagrams_received_total") >= received + 4
        assert value(after, "chatd_datagrams_sent_total") >= 4  # OK, OK, the line, PONG...
        assert value(after, "chatd_chat_lines_total") == 1
        assert value(after, "process_resident_memory_bytes") > 0
        assert value(after, "process_open_fds") > 0  # the daemon's, read by its admin child
    finally:
        alice.close()
        bob.close()


def test_chatctl_metrics_prints_the_same_families(metered):
    server, port = metered
    done = subprocess.run([*CHATCTL, "-c", str(server.config), "metrics"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    printed = families(done.stdout)
    served = families(scrape(port))
    assert printed == served
    assert {"chatd_users", "chatd_datagrams_received", "process_cpu_seconds"} <= set(printed)


def test_chatctl_metrics_works_without_the_endpoint(chatd):
    done = subprocess.run([*CHATCTL, "-c", str(chatd.config), "metrics"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert value(done.stdout, "chatd_max_users") == 1000


def test_other_paths_and_methods_are_refused(metered):
    _, port = metered
    with pytest.raises(urllib.error.HTTPError) as err:
        _OPENER.open(f"http://127.0.0.1:{port}/", timeout=10)
    assert err.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        _OPENER.open(request, timeout=10)
    assert err.value.code == 405
    assert "chatd_users" in scrape(port, "/metrics?name[]=chatd_users")


def _listening_inodes() -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_metrics_are_off_by_default(chatd):
    pids = [chatd.proc.pid, *children_of(chatd.proc.pid)]
    assert len(pids) == 2  # the daemon and its admin child
    owned = set().union(*(_socket_inodes(pid) for pid in pids))
    assert owned and not owned & _listening_inodes()


def test_metrics_listen_in_use_is_a_start_up_error_naming_the_key(make_chatd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        server = make_chatd({"metrics": {"listen": where}}, start=False)
        for verb in ("run", "start"):
            done = subprocess.run([*CHATD, verb, "-c", str(server.config)], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL,
                                  env={**server.env, "NOTIFY_SOCKET": ""})
            assert done.returncode == 1, (verb, done.stdout, done.stderr)
            assert f"metrics.listen: cannot listen on {where}: Address already in use" \
                in done.stderr, (verb, done.stderr)
            assert not (server.runtime_dir / "chatd.pid").exists()
    # and the UDP port was let go: the same config starts once the TCP port is free
    server.start()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_and_idle_clients_do_not_stop_a_scrape(metered):
    """A slowloris, more idle connections than the child serves at once, and a huge
    request: a scrape still gets through, and the attacker's connections are bounded."""
    server, port = metered
    slow = _connect(port)
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    idle = [_connect(port) for _ in range(metrics_http.MAX_CONNECTIONS + 8)]
    try:
        huge = _connect(port)
        huge.sendall(b"GET /" + b"a" * (metrics_http.MAX_REQUEST_HEAD + 100))
        assert huge.recv(100).startswith(b"HTTP/1.1 431 ")
        huge.close()
        assert "chatd_users" in scrape(port)
        # the child keeps no more than its limit: the oldest idle ones were closed
        assert _closed_by_server(slow, timeout=5)
        assert _closed_by_server(idle[0], timeout=5)
        # and the room never noticed
        user = UdpUser(server.addr).join("carol")
        assert user.ping() == b"PONG"
        user.close()
    finally:
        for sock in (slow, *idle):
            sock.close()


def test_a_trickling_client_is_cut_off_at_its_deadline(metered):
    _, port = metered
    slow = _connect(port)
    started = time.monotonic()
    closed = False
    try:
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            try:
                slow.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if _closed_by_server(slow, timeout=0.5):
                closed = True
                break
            assert time.monotonic() - started < metrics_http.CONNECTION_TIMEOUT + 20
        assert closed
        assert time.monotonic() - started >= metrics_http.CONNECTION_TIMEOUT - 1
        assert "chatd_users" in scrape(port)
    finally:
        slow.close()


def test_a_replaced_admin_child_serves_the_same_port(metered):
    server, port = metered
    assert value(scrape(port), "chatd_admin_child_restarts_total") == 0
    [child] = children_of(server.proc.pid)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: (children := children_of(server.proc.pid)) and children != [child],
             timeout=20, what="a new admin child")

    def restarted():
        try:
            text = scrape(port, timeout=5)
        except OSError:
            return None
        return text if value(text, "chatd_admin_child_restarts_total") == 1 else None

    wait_for(restarted, timeout=20, interval=0.3, what="a scrape from the new admin child")


def test_scrapes_do_not_wait_on_a_stopped_daemon_forever(metered):
    """The daemon stopped (SIGSTOP): the child answers 503 within its status timeout and
    serves again once the daemon runs."""
    server, port = metered  # not scraped yet: no answer is fresh
    server.signal(signal.SIGSTOP)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            _OPENER.open(f"http://127.0.0.1:{port}/metrics",
                         timeout=metrics_http.STATUS_TIMEOUT + 10)
        assert err.value.code == 503
    finally:
        server.signal(signal.SIGCONT)
    wait_for(lambda: _scrapes(port), timeout=20, interval=0.3, what="a scrape after SIGCONT")


def _scrapes(port: int) -> bool:
    try:
        return "chatd_users" in scrape(port, timeout=5)
    except (OSError, urllib.error.HTTPError):
        return False


def test_metrics_docs_list_every_metric():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    text = render({**STATUS, "pid": os.getpid()}).decode()
    assert "process_open_fds" in families(text)
    for name in families(text):
        if name.startswith("chatd_brand_new") or name.startswith("chatd_odd_name"):
            continue  # made up for the test above
        exposed = name + ("_total" if families(text)[name] == "counter" else "")
        assert f"`{exposed}`" in docs or f"`{exposed}{{" in docs, exposed


def test_without_metrics_nothing_loads_prometheus_client():
    """The default path stays as light as it was: the daemon, its admin child and the
    other chatctl verbs import prometheus_client only when metrics are asked for."""
    code = ("import sys, chatd.daemon, chatd.admin, chatd.server, chatd.cli.chatctl; "
            "sys.exit('prometheus_client' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
