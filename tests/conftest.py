"""Fixtures: every daemon a test starts is stopped by a finalizer, even when the test fails."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ChatdProcess, LocalUser, UdpUser
from redisproc import REDIS_SERVER, RedisServer


@pytest.fixture
def make_chatd(tmp_path) -> Iterator[Callable[..., ChatdProcess]]:
    """Start ``chatd run`` with config overrides; each gets its own directory."""
    started: list[ChatdProcess] = []

    def make(overrides: dict | None = None, *, start: bool = True, **kwargs) -> ChatdProcess:
        directory = tmp_path / f"chatd{len(started)}"
        directory.mkdir()
        server = ChatdProcess(directory, overrides, **kwargs)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def chatd(make_chatd) -> ChatdProcess:
    return make_chatd()


@pytest.fixture
def users(chatd) -> Iterator[Callable[[str], UdpUser]]:
    """``users("alice")`` is a logged-in UDP user of the ``chatd`` fixture's server."""
    made: list[UdpUser] = []

    def make(name: str | None = None) -> UdpUser:
        user = UdpUser(chatd.addr, name)
        made.append(user)
        return user.join(name) if name else user

    yield make
    for user in made:
        user.close()


@pytest.fixture
def local_users() -> Iterator[Callable[..., LocalUser]]:
    """``local_users(groups=("g",))`` is a new real user; ``local_users.group()`` a new
    group. All are removed at teardown. Skipped unless root, which useradd needs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users with useradd")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    users: list[str] = []
    groups: list[str] = []

    def make(groups: tuple[str, ...] = ()) -> LocalUser:
        name = f"chatdt{uuid.uuid4().hex[:8]}"
        _account_tool("useradd", "--system", "--user-group", "--no-create-home",
                      "--shell", "/usr/sbin/nologin", name)
        users.append(name)
        for group in groups:
            _account_tool("usermod", "--append", "--groups", group, name)
        return LocalUser(name, tuple(groups))

    def group() -> str:
        name = f"chatdg{uuid.uuid4().hex[:8]}"
        _account_tool("groupadd", "--system", name)
        groups.append(name)
        return name

    make.group = group  # type: ignore[attr-defined]
    yield make
    for name in users:
        _account_tool("userdel", "--force", name, check=False)
    for name in groups:
        _account_tool("groupdel", name, check=False)


def _account_tool(*argv: str, check: bool = True) -> None:
    """useradd and friends, one at a time across the test workers: two at once fail to
    lock /etc/passwd ("cannot lock /etc/passwd; try again later")."""
    with open("/run/chatd-tests-accounts.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(argv, check=check, capture_output=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="chatd-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own, on a free port, without persistence."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/test-deps.sh installs it)")
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()
