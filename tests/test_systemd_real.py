"""chatd's units under the machine's real systemd, booted in a sandbox (tests/sandbox.py).

tests/test_systemd.py plays systemd's side with an emulator, which runs the
units as root and ignores DynamicUser=, RuntimeDirectory= and the sandboxing;
what only systemd does (conflicting units handing over the port and
/run/chatd, the watchdog, socket activation, journald's priorities, the
security rating) is tested here. One sandbox serves the module: it boots,
`make install PREFIX=/usr/local` runs inside (pip finds the dependencies in a
folder of wheels fetched on the host, as the sandbox has no network), and each
test then starts from no chatd unit running and the installed configuration.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import UdpUser, wait_for
from sandbox import Sandbox, unavailable

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = "/usr/src/chatd"  # where the tree is copied inside
WHEEL_DIR = "/opt/chatd-wheels"
CONFIG = "/etc/chatd/chatd.yaml"
DROP_IN_DIR = "/etc/systemd/system/chatd.service.d"
UNITS = ("chatd.socket", "chatd.service", "chatd-forking.service")
PORT = 8888  # the installed configuration's and chatd.socket's
ADMIN_LINE = "\nadmin says: {}"
SHUTDOWN_LINE = b"\nthe server is shutting down"
SOURCES = ("Makefile", "pyproject.toml", "README.md", "chatd", "scripts", "systemd", "man", "etc")

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.timeout(240)]


# -- the sandbox, with chatd installed -------------------------------------------------------


class Machine(Sandbox):
    """The sandbox with chatd installed, and what the tests ask of it."""

    install_output = ""
    config_text = ""  # /etc/chatd/chatd.yaml as `make install` wrote it

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def is_running(self, unit: str) -> bool:
        return self.show(unit, "ActiveState")["ActiveState"] == "active"

    def write_config(self, text: str) -> None:
        (self.root / CONFIG.lstrip("/")).write_text(text)

    def edited_config(self, old: str, new: str) -> str:
        assert old in self.config_text, old
        return self.config_text.replace(old, new, 1)

    def chatctl_json(self, *args: str) -> Any:
        return json.loads(self.run("chatctl", *args, "--json", check=True).stdout)


def inner_python() -> str | None:
    """A system interpreter for the installed venv: the units hide /root and /home."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0:
            return candidate
    return None


def fetch_wheels(directory: Path, python: str) -> None:
    """chatd's dependencies and build requirements as wheels, for pip without a network.

    The sandbox's interpreter's own pip fetches them (from a throw-away venv): only it
    evaluates markers such as redis's ``python_full_version < "3.11.3"`` as the install
    inside will (``pip download --python-version`` evaluates them for the host's).
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]
    venv = directory.parent / f"{directory.name}-pip"
    made = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True,
                          timeout=300)
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv with {python}: {made.stderr[-300:]}")
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "download", "--quiet",
         "--disable-pip-version-check", "--only-binary=:all:", "-d", str(directory), *wanted],
        capture_output=True, text=True, timeout=300)
    shutil.rmtree(venv, ignore_errors=True)
    if result.returncode != 0:
        pytest.skip(f"cannot fetch chatd's dependencies for the sandbox: {result.stderr[-300:]}")


def place_source(root: Path) -> None:
    """The tree `make install` needs, without .venv or build leftovers."""
    target = root / SOURCE_DIR.lstrip("/")
    target.mkdir(parents=True)
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, target / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, target / name)


def forget_host_install(root: Path) -> None:
    """A chatd installed or run on the host would shadow the one under test: its config, or
    a /var/log/chatd that root made for `chatd start` (the units' dynamic user could not write
    there, and check-config refuses the start)."""
    for path in ("etc/chatd", "usr/local/lib/chatd", "etc/systemd/system/chatd.service.d",
                 "var/log/chatd", "var/lib/chatd", "run/chatd"):
        shutil.rmtree(root / path, ignore_errors=True)
    for unit in UNITS:
        for directory in ("usr/local/lib/systemd/system", "etc/systemd/system"):
            with contextlib.suppress(FileNotFoundError):
                (root / directory / unit).unlink()


def install_inside(machine: Machine, wheels: Path, python: str) -> subprocess.CompletedProcess:
    """Boot ``machine`` with this tree in it and run ``make install`` there, from wheels
    fetched on the host (the sandbox has no network); on success the installed config's
    text is kept as ``machine.config_text``. The caller shuts the machine down."""
    fetch_wheels(wheels, python)
    root = machine.mount_root()
    place_source(root)
    shutil.copytree(wheels, root / WHEEL_DIR.lstrip("/"))
    forget_host_install(root)
    machine.boot()
    installed = machine.run(
        "env", "PIP_CONFIG_FILE=/dev/null", "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEEL_DIR}",
        "make", "--no-print-directory", "-C", SOURCE_DIR, "install", "PREFIX=/usr/local",
        f"PYTHON={python}", timeout=300)
    if installed.returncode == 0:
        machine.config_text = (root / CONFIG.lstrip("/")).read_text()
    return installed


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    python = inner_python()
    if python is None:
        pytest.skip("no system python3 with venv and ensurepip (Debian package python3-venv)")
    sandbox = Machine(tmp_path_factory.mktemp("sandbox"))
    try:
        installed = install_inside(sandbox, tmp_path_factory.mktemp("wheels"), python)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        sandbox.install_output = installed.stdout
        yield sandbox
    finally:
        sandbox.shutdown()


@pytest.fixture(autouse=True)
def fresh_state(machine: Machine) -> Iterator[None]:
    """Every test starts and ends with no chatd unit running and the installed config."""
    yield
    machine.run("systemctl", "stop", *UNITS)
    machine.run("systemctl", "reset-failed")
    machine.write_config(machine.config_text)
    drop_ins = machine.root / DROP_IN_DIR.lstrip("/")
    if drop_ins.exists():
        shutil.rmtree(drop_ins)
        machine.run("systemctl", "daemon-reload", check=True)


@pytest.fixture
def journal(machine: Machine) -> Callable[..., list[dict[str, Any]]]:
    """``journal(*journalctl_args)``: the matching entries logged since the test began.

    Entries are told apart by time, not with --after-cursor: journalctl skips the first
    match after the cursor when the cursor's own entry does not match the filters.
    """
    last = machine.run("journalctl", "-n", "1", "-o", "json", "--no-pager").stdout.strip()
    began = int(json.loads(last)["__REALTIME_TIMESTAMP"]) if last else 0

    def entries(*args: str) -> list[dict[str, Any]]:
        machine.run("journalctl", "--sync")
        out = machine.run("journalctl", "--no-pager", "-o", "json", *args, check=True).stdout
        found = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in found if int(e["__REALTIME_TIMESTAMP"]) > began]

    return entries


@pytest.fixture
def user(machine: Machine) -> Iterator[Callable[[str], UdpUser]]:
    """``user("alice")``: a UDP user inside the sandbox's network (not yet logged in)."""
    made: list[UdpUser] = []

    def make(name: str) -> UdpUser:
        made.append(machine.in_network(lambda: UdpUser(("127.0.0.1", PORT), name)))
        return made[-1]

    yield make
    for one in made:
        one.close()


# -- helpers ---------------------------------------------------------------------------------


def message(entry: dict[str, Any]) -> str:
    text = entry.get("MESSAGE", "")
    return bytes(text).decode(errors="replace") if isinstance(text, list) else text


def login(user: UdpUser, timeout: float = 30.0) -> bytes:
    """Log in, allowing for a daemon that systemd is still starting."""
    user.send(f"L {user.name}")
    return user.recv(timeout)


# -- installing ------------------------------------------------------------------------------


def test_make_install_inside_installs_loadable_units(machine: Machine) -> None:
    assert "install.sh: done" in machine.install_output
    for unit in UNITS:
        props = machine.show(unit, "LoadState", "FragmentPath")
        assert props == {"LoadState": "loaded",
                         "FragmentPath": f"/usr/local/lib/systemd/system/{unit}"}, unit
    assert "runtime_dir: /run/chatd" in machine.config_text
    version = machine.run("chatd", "--version", check=True).stdout
    assert version.startswith("chatd ")


# -- the life of a service -------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["chatd.service", "chatd-forking.service"])
def test_start_status_login_chatctl_reload_stop(machine: Machine, user, unit: str) -> None:
    machine.run("systemctl", "start", unit, check=True)
    props = machine.show(unit, "ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    main_pid = int(props["MainPID"])
    assert main_pid > 0

    status = machine.run("systemctl", "status", "--no-pager", unit)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "active (running)" in status.stdout
    assert f"Main PID: {main_pid}" in status.stdout
    if unit == "chatd.service":  # STATUS= from sd_notify
        assert f'Status: "serving 0.0.0.0:{PORT}, 0 users"' in status.stdout

    alice = user("alice")
    assert login(alice) == b"OK"
    described = machine.chatctl_json("status")
    assert described["pid"] == main_pid
    assert described["users"] == 1
    assert [u["name"] for u in machine.chatctl_json("who")] == ["alice"]
    machine.run("chatctl", "say", "hello", "from", "root", check=True)
    assert alice.recv_text(10) == ADMIN_LINE.format("hello from root")

    # reload: the new setting is live, the main pid and alice's session stay
    machine.write_config(machine.edited_config("  max_users: 1000\n", "  max_users: 999\n"))
    machine.run("systemctl", "reload", unit, check=True)
    wait_for(lambda: machine.chatctl_json("status")["max_users"] == 999, timeout=30,
             what="the reloaded max_users")
    assert machine.show(unit, "MainPID")["MainPID"] == str(main_pid)
    assert machine.is_running(unit)
    assert alice.ping() == b"PONG"

    machine.run("systemctl", "stop", unit, check=True)
    assert alice.recv(10) == SHUTDOWN_LINE
    assert alice.recv(10) == b"EXIT"
    props = machine.show(unit, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert machine.run("test", "-e", "/run/chatd").returncode != 0  # RuntimeDirectory= removed


# -- the conflicting units (issue 13, item 12) ------------------------------------------------


# forking -> notify -> forking -> socket (which starts chatd.service) -> forking
SWITCHES = ("chatd-forking.service", "chatd.service", "chatd-forking.service", "chatd.socket",
            "chatd-forking.service")


def test_one_start_switches_between_conflicting_units(machine: Machine, user) -> None:
    """Conflicts= alone stopped the one while the other started, in parallel: the starting
    one found /run/chatd being removed (226/NAMESPACE) or the port still bound, and the
    stopping chatd.service could not remove its files from the new /run/chatd (exit 1)."""
    machine.run("systemctl", "start", SWITCHES[0], check=True)
    for step, (before, unit) in enumerate(zip(SWITCHES, SWITCHES[1:], strict=False)):
        switched = machine.run("systemctl", "start", unit)
        assert switched.returncode == 0, f"{before} -> {unit}: {switched.stderr}" + machine.run(
            "journalctl", "--no-pager", "-n", "30", "-u", unit, "-u", before).stdout
        assert machine.is_running(unit)
        for other in UNITS:
            if other != unit:
                assert not machine.is_running(other), (before, unit, other)
            # the one that was stopped stopped cleanly: nothing failed on either side
            assert machine.run("systemctl", "is-failed", "--quiet", other).returncode != 0, (
                before, unit, other)
        # the new one serves (through chatd.socket, this starts chatd.service)
        assert login(user(f"user{step}")) == b"OK", (before, unit)


# -- leaving cleanly (item 13) ---------------------------------------------------------------


def test_stop_succeeds_when_the_runtime_dir_belongs_to_another_user(
        machine: Machine, journal) -> None:
    machine.run("systemctl", "start", "chatd.service", check=True)
    owner = int(machine.run("stat", "-c", "%u", "/run/chatd", check=True).stdout)
    machine.run("chown", str(owner + 1), "/run/chatd", check=True)  # another dynamic user

    # SIGTERM to the daemon alone: `systemctl stop` runs ExecStop= first, and systemd
    # chowns the RuntimeDirectory= back to the unit's user for it, before the daemon stops
    machine.run("systemctl", "kill", "--kill-whom=main", "-s", "TERM", "chatd.service",
                check=True)
    wait_for(lambda: not machine.is_running("chatd.service"), timeout=30,
             what="chatd.service stopped")
    props = machine.show("chatd.service", "Result", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainStatus": "0"}
    warnings = [json.loads(message(e)) for e in journal("-u", "chatd.service", "-p", "warning")
                if "control_file_not_removed" in message(e)]
    assert warnings, "the files left behind are not logged"
    assert {w["path"] for w in warnings} == {"/run/chatd/control.sock", "/run/chatd/control.fifo"}


def test_systemctl_stop_succeeds_after_the_runtime_dir_changed_owner(machine: Machine) -> None:
    machine.run("systemctl", "start", "chatd.service", check=True)
    owner = int(machine.run("stat", "-c", "%u", "/run/chatd", check=True).stdout)
    machine.run("chown", str(owner + 1), "/run/chatd", check=True)
    machine.run("systemctl", "stop", "chatd.service", check=True)
    props = machine.show("chatd.service", "Result", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainStatus": "0"}


# -- journald ------------------------------------------------------------------------------


def test_journal_records_each_line_at_its_level(machine: Machine, journal) -> None:
    machine.run("systemctl", "start", "chatd.service", check=True)
    # a setting that needs a restart (warning), then a broken file (error)
    machine.write_config(machine.edited_config(f"  port: {PORT}\n", f"  port: {PORT + 1}\n"))
    machine.run("systemctl", "reload", "chatd.service", check=True)
    # a value of the wrong type (a second room: block would be a duplicate key instead)
    machine.write_config(machine.edited_config("  max_users: 1000\n", "  max_users: lots\n"))
    machine.run("systemctl", "reload", "chatd.service", check=True)

    def events(*args: str) -> dict[str, str]:
        found = {}
        for entry in journal("-u", "chatd.service", *args):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                found[json.loads(message(entry))["event"]] = entry["PRIORITY"]
        return found

    everything = wait_for(lambda: (e := events()) and "reload_failed" in e and e, timeout=30,
                          what="reload_failed in the journal")
    assert everything["server_started"] == "6"
    assert everything["reload_needs_restart"] == "4"
    assert everything["reload_failed"] == "3"
    assert set(events("-p", "warning")) == {"reload_needs_restart", "reload_failed"}


def test_a_broken_config_fails_the_start_with_an_error_in_the_journal(
        machine: Machine, journal) -> None:
    """ExecStartPre=chatd check-config's message must pass `journalctl -p warning`."""
    # a value of the wrong type (a second room: block would be a duplicate key instead)
    machine.write_config(machine.edited_config("  max_users: 1000\n", "  max_users: lots\n"))
    started = machine.run("systemctl", "start", "chatd.service")
    assert started.returncode != 0
    assert "the control process exited with error code" in started.stderr  # ExecStartPre=
    expected = re.compile(rf"^chatd: config error: {CONFIG}, line \d+: room\.max_users: "
                          r"expected an integer, got 'lots'$")
    errors = wait_for(lambda: [e for e in journal("-u", "chatd", "-p", "warning")
                               if expected.match(message(e))],
                      timeout=30, what="the config error in `journalctl -u chatd -p warning`")
    assert {e["PRIORITY"] for e in errors} == {"3"}


# -- the watchdog --------------------------------------------------------------------------


def test_watchdog_restarts_a_stopped_daemon(machine: Machine, user, journal) -> None:
    drop_ins = machine.root / DROP_IN_DIR.lstrip("/")
    drop_ins.mkdir(parents=True)
    # a short interval for the test; no core file from the SIGABRT that ends the daemon
    (drop_ins / "watchdog.conf").write_text(
        "[Service]\nWatchdogSec=3s\nRestartSec=0.2s\nLimitCORE=0\n")
    machine.run("systemctl", "daemon-reload", check=True)
    machine.run("systemctl", "start", "chatd.service", check=True)
    before = machine.show("chatd.service", "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "3s"

    machine.run("kill", "-STOP", before["MainPID"], check=True)

    def restarted() -> dict[str, str] | None:
        now = machine.show("chatd.service", "MainPID", "NRestarts", "ActiveState")
        fresh = now["MainPID"] not in ("0", before["MainPID"]) and now["ActiveState"] == "active"
        return now if fresh else None

    after = wait_for(restarted, timeout=60, interval=0.2, what="chatd restarted by the watchdog")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert any("Watchdog timeout" in message(e) for e in journal("-u", "chatd.service"))
    assert login(user("dave")) == b"OK"


# -- socket activation ---------------------------------------------------------------------


def test_first_datagram_starts_the_service(machine: Machine, user, journal) -> None:
    machine.run("systemctl", "start", "chatd.socket", check=True)
    assert machine.show("chatd.service", "ActiveState")["ActiveState"] == "inactive"

    assert login(user("erin")) == b"OK"  # held in the socket while chatd starts
    props = machine.show("chatd.service", "ActiveState", "MainPID", "TriggeredBy")
    assert props["ActiveState"] == "active"
    assert "chatd.socket" in props["TriggeredBy"]
    assert machine.chatctl_json("status")["pid"] == int(props["MainPID"])
    events = [json.loads(message(e)) for e in journal("-u", "chatd.service")
              if "socket_activation" in message(e)]
    assert events and events[0]["fd"] == 3


# -- hardening -----------------------------------------------------------------------------


def test_systemd_analyze_security_rates_the_loaded_units(machine: Machine) -> None:
    """The documented scores hold for the units as the running systemd loaded them."""
    docs = (ROOT / "docs" / "systemd.md").read_text()
    for unit in ("chatd.service", "chatd-forking.service"):
        result = machine.run("systemd-analyze", "security", "--no-pager", unit)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", result.stdout)
        assert found, result.stdout + result.stderr
        documented = re.search(rf"\|\s*`{re.escape(unit)}`\s*\|\s*(\d+\.\d+)", docs)
        assert documented, f"docs/systemd.md has no exposure row for {unit}"
        assert found.group(1) == documented.group(1), (unit, found.group(0))
        assert found.group(2) == "OK", found.group(0)


# -- systemctl restart keeps everyone (issue 16) --------------------------------------------


class Conversation:
    """One user says a numbered line every ``interval`` while another listens, both in threads.

    The listener keeps every datagram with the time it arrived: what is missing,
    doubled or out of order shows, and so does the longest pause in delivery.
    """

    def __init__(self, speaker: UdpUser, listener: UdpUser, interval: float = 0.02):
        self.speaker, self.listener, self.interval = speaker, listener, interval
        self.sent = 0
        self.heard: list[tuple[float, bytes]] = []
        self._speaking = threading.Event()
        self._listening = threading.Event()
        self._threads = [threading.Thread(target=self._speak, daemon=True),
                         threading.Thread(target=self._listen, daemon=True)]

    def __enter__(self) -> Conversation:
        self._speaking.set()
        self._listening.set()
        for thread in self._threads:
            thread.start()
        return self

    def _speak(self) -> None:
        next_at = time.monotonic()
        while self._speaking.is_set():
            self.speaker.say(f"line {self.sent}")
            self.sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _listen(self) -> None:
        self.listener.sock.settimeout(0.1)
        while self._listening.is_set():
            try:
                data = self.listener.sock.recv(65536)
            except TimeoutError:
                continue
            self.heard.append((time.monotonic(), data))

    def lines(self) -> list[int]:
        prefix = f"\n{self.speaker.name} says: line ".encode()
        return [int(data[len(prefix):]) for _, data in self.heard if data.startswith(prefix)]

    def finish(self, timeout: float = 30.0) -> None:
        """Stop speaking; wait until the last line was heard, or ``timeout``."""
        self._speaking.clear()
        self._threads[0].join(10)
        wait_for(lambda: self.sent - 1 in self.lines(), timeout=timeout,
                 what=f"line {self.sent - 1} heard")
        self._listening.clear()
        self._threads[1].join(10)

    def longest_pause(self) -> float:
        times = [at for at, _ in self.heard]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def __exit__(self, *exc: object) -> None:
        self._speaking.clear()
        self._listening.clear()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)


def talking_through_a_restart(machine: Machine, user, unit: str = "chatd.service") -> dict:
    """bob talks to alice every 20 ms across `systemctl restart chatd`; what alice heard."""
    alice, bob = user("alice"), user("bob")
    assert login(alice) == b"OK"
    assert login(bob) == b"OK"
    assert alice.recv_text(10) == "\nbob joined the room"
    before = machine.show("chatd.service", "MainPID")["MainPID"]
    with Conversation(bob, alice) as talk:
        wait_for(lambda: len(talk.lines()) >= 10, timeout=30, what="the conversation going")
        began = time.monotonic()
        machine.run("systemctl", "restart", "chatd.service", check=True)
        took = time.monotonic() - began
        wait_for(lambda: len(talk.lines()) >= talk.sent - 1 and talk.sent > 0
                 and time.monotonic() - began > took + 0.5, timeout=30,
                 what="talk after the restart")
        talk.finish()
    after = machine.show("chatd.service", "MainPID", "ActiveState", "NFileDescriptorStore")
    others = [data for _, data in talk.heard if not data.startswith(b"\nbob says: line ")]
    bob_heard = bob.drain()
    return {"talk": talk, "before": before, "after": after, "others": others,
            "bob_heard": bob_heard, "restart_seconds": took, "alice": alice, "bob": bob}


def test_systemctl_restart_keeps_everyone(machine: Machine, user, journal) -> None:
    machine.run("systemctl", "start", "chatd.service", check=True)
    seen = talking_through_a_restart(machine, user)
    talk = seen["talk"]

    assert talk.lines() == list(range(talk.sent))  # every line, once, in order
    assert seen["others"] == []  # no goodbye, no EXIT, no "left"/"joined" notice
    assert b"EXIT" not in seen["bob_heard"] and SHUTDOWN_LINE not in seen["bob_heard"]
    assert seen["after"]["MainPID"] not in ("0", seen["before"])
    assert seen["after"]["ActiveState"] == "active"
    assert seen["after"]["NFileDescriptorStore"] == "0"  # taken back and dropped
    assert [u["name"] for u in machine.chatctl_json("who")] == ["alice", "bob"]
    status = machine.chatctl_json("status")
    assert status["taken_over_from"] == int(seen["before"])
    assert seen["bob"].ping() == b"PONG"
    done = [json.loads(message(e)) for e in journal("-u", "chatd.service")
            if '"handover_done"' in message(e)]
    assert done and done[-1]["via"] == "systemd" and done[-1]["sessions"] == 2
    print(f"\nsystemctl restart: longest pause in delivery {talk.longest_pause() * 1000:.0f} ms, "
          f"{talk.sent} lines, none lost; `systemctl restart` took "
          f"{seen['restart_seconds']:.2f} s, pause_ms {done[-1].get('pause_ms')}")


def test_systemctl_stop_still_says_goodbye_and_empties_the_store(
        machine: Machine, user) -> None:
    machine.run("systemctl", "start", "chatd.service", check=True)
    alice = user("alice")
    assert login(alice) == b"OK"
    machine.run("systemctl", "restart", "chatd.service", check=True)
    assert alice.ping() == b"PONG"  # kept across the restart

    machine.run("systemctl", "stop", "chatd.service", check=True)
    assert alice.recv(10) == SHUTDOWN_LINE
    assert alice.recv(10) == b"EXIT"
    props = machine.show("chatd.service", "Result", "ExecMainStatus", "NFileDescriptorStore")
    assert props == {"Result": "success", "ExecMainStatus": "0", "NFileDescriptorStore": "0"}

    # a plain start after the stop is a fresh room: nobody from before
    machine.run("systemctl", "start", "chatd.service", check=True)
    assert machine.chatctl_json("who") == []
    assert "taken_over_from" not in machine.chatctl_json("status")


def test_systemctl_restart_with_a_broken_config_says_goodbye(machine: Machine, user) -> None:
    """systemd stops before it starts, so the old process cannot wait to see the new one
    ready: a file the new one would refuse gets the goodbye, as before, not a room handed to
    a process that never comes."""
    machine.run("systemctl", "start", "chatd.service", check=True)
    alice = user("alice")
    assert login(alice) == b"OK"
    machine.write_config(machine.edited_config("  max_users: 1000\n", "  max_users: lots\n"))
    assert machine.run("systemctl", "restart", "chatd.service").returncode != 0
    assert alice.recv(10) == SHUTDOWN_LINE
    assert alice.recv(10) == b"EXIT"
    assert machine.show("chatd.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "0"


def test_systemctl_restart_with_chatd_socket_keeps_everyone(machine: Machine, user) -> None:
    machine.run("systemctl", "start", "chatd.socket", check=True)
    seen = talking_through_a_restart(machine, user)
    talk = seen["talk"]
    assert talk.lines() == list(range(talk.sent))
    assert seen["others"] == []
    assert seen["after"]["MainPID"] not in ("0", seen["before"])
    assert [u["name"] for u in machine.chatctl_json("who")] == ["alice", "bob"]
    assert machine.is_running("chatd.socket")
    print(f"\nsystemctl restart with chatd.socket: longest pause in delivery "
          f"{talk.longest_pause() * 1000:.0f} ms, {talk.sent} lines, none lost")


def test_forking_unit_hands_over_on_sigusr2_and_systemd_follows_the_new_pid(
        machine: Machine, user) -> None:
    """chatd-forking.service's handover restart (docs/systemd.md): SIGUSR2 to the main
    process; the new daemon, forked inside the unit's cgroup, writes the pidfile before
    the old one exits, and systemd takes it as the new main process."""
    unit = "chatd-forking.service"
    machine.run("systemctl", "start", unit, check=True)
    before = int(machine.show(unit, "MainPID")["MainPID"])
    alice, bob = user("alice"), user("bob")
    assert login(alice) == b"OK"
    assert login(bob) == b"OK"
    assert alice.recv_text(10) == "\nbob joined the room"
    with Conversation(bob, alice) as talk:
        wait_for(lambda: len(talk.lines()) >= 10, timeout=30, what="the conversation going")
        machine.run("systemctl", "kill", "-s", "USR2", "--kill-whom=main", unit, check=True)
        wait_for(lambda: machine.show(unit, "MainPID")["MainPID"] not in ("0", str(before)),
                 timeout=30, interval=0.2, what="systemd to follow the new main pid")
        sent = talk.sent
        wait_for(lambda: len(talk.lines()) >= sent + 10, timeout=30, what="talk afterwards")
        talk.finish()
    assert talk.lines() == list(range(talk.sent))  # every line, once, in order
    assert [data for _, data in talk.heard if not data.startswith(b"\nbob says: line ")] == []
    after = machine.show(unit, "MainPID", "ActiveState", "SubState")
    assert (after["ActiveState"], after["SubState"]) == ("active", "running")
    assert machine.chatctl_json("status")["pid"] == int(after["MainPID"])
    assert sorted(u["name"] for u in machine.chatctl_json("who")) == ["alice", "bob"]
    machine.run("systemctl", "stop", unit, check=True)
    # a stop after the handover still says goodbye (ExecStop=+chatd stop: systemd itself
    # would SIGKILL a main process that is not its child)
    assert b"EXIT" in alice.drain(2.0)
