"""Fixtures: every daemon a test starts is stopped by a finalizer, even when the test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import ChatdProcess, UdpUser


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
