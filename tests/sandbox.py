"""A real systemd for tests: the machine's own, booted as PID 1 of fresh namespaces.

The units can only be judged by the program that runs them: ``DynamicUser=``,
``RuntimeDirectory=``, the sandboxing, ``Conflicts=``, the watchdog and
socket activation are all systemd's doing, and no emulator reproduces them.
So :class:`Sandbox` boots ``/lib/systemd/systemd`` as PID 1 of new pid, mount,
UTS, IPC, network and cgroup namespaces, on an overlay of ``/`` whose changes go
to a tmpfs: what the tests install, start and break inside vanishes with it,
and nothing they bind touches the host's network (the sandbox has its own
loopback). Booting takes about a second.

The namespaces are made by util-linux (``unshare``, ``nsenter``, ``setpriv``),
the mounts are those systemd-nspawn would make. It needs root with
CAP_SYS_ADMIN; :func:`unavailable` says why it cannot run here, for a skip.
Everything it starts hangs off one process, killed by its pid on the way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SYSTEMD = "/lib/systemd/systemd"
CAP_SYS_ADMIN = 21
CLONE_NEWNET = 0x40000000
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
}
TOOLS = ("unshare", "nsenter", "setpriv", "systemctl", "mount", "umount")
# capabilities the container's systemd has no business with (as systemd-nspawn drops them)
DROPPED_CAPS = ("sys_module", "sys_time", "sys_rawio", "sys_pacct", "mac_admin", "mac_override",
                "syslog", "wake_alarm", "block_suspend", "bpf", "perfmon")
# the host's services stay off inside, except what a booted system needs to be tested
KEEP_ENABLED = (".target", "systemd-journald", "dbus", "systemd-logind")

T = TypeVar("T")

# PID 1 of the new namespaces, before it becomes systemd: the mounts systemd-nspawn would
# make, then pivot_root into the overlay. Arguments: the overlay's root, the console's pty.
STAGE2 = r"""#!/bin/bash
set -e
R=$1; CONSOLE=$2
mount --make-rprivate /
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"; mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid,size=64m dev "$R/dev"
for d in null zero full random urandom tty; do
    touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
touch "$R/dev/console"; mount --bind "$CONSOLE" "$R/dev/console"
mount -t tmpfs -o mode=755,nosuid,nodev,size=256m run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=1g tmp "$R/tmp"
cd "$R"; mkdir -p oldroot; pivot_root . oldroot; umount -l /oldroot; rmdir /oldroot
exec setpriv --bounding-set "$DROP" env -i container=unshare TERM=xterm \
    /lib/systemd/systemd --system --log-level=info --show-status=no \
    </dev/console >/dev/console 2>&1
"""


class SandboxError(RuntimeError):
    """The sandbox did not come up; the message names the console log."""


def unavailable() -> str | None:
    """Why a sandbox cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "booting systemd in a sandbox needs root"
    if not _has_capability(CAP_SYS_ADMIN):
        return "booting systemd in a sandbox needs CAP_SYS_ADMIN (mounts and namespaces)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is absent (Debian package systemd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (util-linux, systemd)"
    if _cgroup2_root() is None:
        return "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    return None


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _cgroup2_root() -> Path | None:
    """Where cgroup2 is mounted: the "unified" part of a hybrid layout, or /sys/fs/cgroup."""
    for path in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (path / "cgroup.subtree_control").exists():
            return path
    return None


class Sandbox:
    """One booted systemd: ``boot()``, then ``run()`` commands inside, then ``shutdown()``."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir.resolve()
        self.root = self.state_dir / "root"  # the sandbox's / as the host sees it
        self.console_log = self.state_dir / "console.log"
        self.pid1: int | None = None  # the host's pid of the sandbox's systemd
        cgroup2 = _cgroup2_root()
        assert cgroup2 is not None, unavailable()
        self._cgroup = cgroup2 / f"chatd-sandbox-{os.getpid()}-{self.state_dir.name}"
        self._unshare: subprocess.Popen | None = None
        self._console_fd: int | None = None
        self._drain: threading.Thread | None = None
        self._mounts: list[Path] = []

    # -- booting -----------------------------------------------------------------

    def mount_root(self) -> Path:
        """The throw-away overlay of /; files put under ``root`` before boot are seen inside."""
        upper = self.state_dir / "changes"
        upper.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self._mount("-t", "tmpfs", "-o", "size=2g,mode=755", "chatd-sandbox", str(upper))
        (upper / "upper").mkdir()
        (upper / "work").mkdir()
        self._mount("-t", "overlay", "-o",
                    f"lowerdir=/,upperdir={upper}/upper,workdir={upper}/work",
                    "chatd-sandbox", str(self.root))
        self._quiet_host_services()
        (self.root / "etc/hostname").write_text("sandbox\n")
        machine_id = Path("/proc/sys/kernel/random/uuid").read_text().strip().replace("-", "")
        (self.root / "etc/machine-id").write_text(machine_id + "\n")
        return self.root

    def _mount(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True, capture_output=True, text=True)
        self._mounts.append(Path(args[-1]))

    def _quiet_host_services(self) -> None:
        listed = subprocess.run(
            ["systemctl", f"--root={self.root}", "list-unit-files", "--state=enabled",
             "--no-legend"], capture_output=True, text=True, check=False)
        units = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
        masked = [u for u in units if not any(keep in u for keep in KEEP_ENABLED)]
        masked += ["getty@tty1.service", "console-getty.service", "systemd-timesyncd.service"]
        subprocess.run(["systemctl", f"--root={self.root}", "mask", *masked],
                       capture_output=True, check=False)

    def boot(self, timeout: float = 60.0) -> None:
        """Start systemd on the mounted root and wait until the system is up."""
        if not self._mounts:
            self.mount_root()
        stage2 = self.state_dir / "stage2.sh"
        stage2.write_text(STAGE2)
        stage2.chmod(0o755)
        self._cgroup.mkdir()
        # systemd needs a terminal for /dev/console; the test keeps what it prints
        master, slave = os.openpty()
        self._console_fd = master
        self._drain = threading.Thread(target=self._drain_console, daemon=True)
        self._drain.start()
        env = {"PATH": INSIDE_ENV["PATH"], "DROP": ",".join(f"-{c}" for c in DROPPED_CAPS)}
        # the shell joins the new cgroup first: that cgroup becomes the namespace's root
        self._unshare = subprocess.Popen(
            ["bash", "-c", 'echo $$ > "$0/cgroup.procs" && exec unshare --pid --fork --kill-child '
             '--mount --uts --ipc --net --cgroup --propagation private "$@"',
             str(self._cgroup), str(stage2), str(self.root), os.ttyname(slave)],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        deadline = time.monotonic() + timeout
        self.pid1 = self._await(self._find_pid1, deadline, "systemd to start")
        self._await(self._manager_listens, deadline, "systemd's private bus")
        state = self.run("systemctl", "is-system-running", "--wait",
                         timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
        if state not in ("running", "degraded"):
            raise SandboxError(f"the sandbox's systemd is {state!r}; see {self.console_log}")

    def _await(self, probe: Callable[[], T | None], deadline: float, what: str) -> T:
        while True:
            value = probe()
            if value:
                return value
            if self._unshare is not None and self._unshare.poll() is not None:
                raise SandboxError(f"the sandbox exited while waiting for {what}; "
                                   f"see {self.console_log}")
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out waiting for {what}; see {self.console_log}")
            time.sleep(0.05)

    def _find_pid1(self) -> int | None:
        assert self._unshare is not None
        pid = self._unshare.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            # the child is systemd once stage2 has exec'd it
            if children and os.readlink(f"/proc/{children[0]}/exe").endswith("/systemd"):
                return int(children[0])
        except OSError:
            pass
        return None

    def _manager_listens(self) -> bool:
        return self.pid1 is not None and Path(
            f"/proc/{self.pid1}/root/run/systemd/private").is_socket()

    def _drain_console(self) -> None:
        assert self._console_fd is not None
        with open(self.console_log, "ab") as log:
            while True:
                try:
                    data = os.read(self._console_fd, 65536)
                except OSError:  # EIO: every process holding the terminal is gone
                    return
                if not data:
                    return
                log.write(data)
                log.flush()

    # -- using it ----------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 60.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside (every namespace, a clean environment), as root."""
        assert self.pid1 is not None, "boot() first"
        env = [f"{key}={value}" for key, value in INSIDE_ENV.items()]
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *env, *argv],
            capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def in_network(self, make: Callable[[], T]) -> T:
        """``make()`` called in the sandbox's network namespace, so its sockets live there.

        A socket belongs to the namespace it was created in, and setns() moves only
        the calling thread: a short-lived thread enters, creates, and is gone.
        """
        assert self.pid1 is not None, "boot() first"
        outcome: dict[str, object] = {}

        def enter_and_make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/proc/{self.pid1}/ns/net") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, os.strerror(errno))
                outcome["value"] = make()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=enter_and_make)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    # -- tearing down ------------------------------------------------------------

    def shutdown(self, timeout: float = 15.0) -> None:
        """Power off (SIGRTMIN+4 to systemd), kill by pid what did not stop, unmount all."""
        if self._unshare is not None:
            if self._unshare.poll() is None and self.pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 4)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._unshare.wait(timeout)
            if self._unshare.poll() is None:
                # SIGKILL to a pid namespace's init ends every process in it; before systemd
                # runs, unshare's own death does that (--kill-child)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1 or self._unshare.pid, signal.SIGKILL)
            self._unshare.wait(timeout)
            self._unshare = None
        if self._drain is not None:
            self._drain.join(5.0)
            self._drain = None
        if self._console_fd is not None:
            os.close(self._console_fd)
            self._console_fd = None
        self._remove_cgroup()
        for mountpoint in reversed(self._mounts):
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        self._mounts.clear()
        self.pid1 = None

    def _remove_cgroup(self) -> None:
        """The cgroup tree systemd made below ours, leaves first (empty ones only)."""
        if not self._cgroup.exists():
            return
        deadline = time.monotonic() + 5.0
        while self._cgroup.exists():
            for directory, _, _ in sorted(os.walk(self._cgroup), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            if time.monotonic() > deadline:
                return
            if self._cgroup.exists():
                time.sleep(0.05)
