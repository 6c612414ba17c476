"""Terminal mode: a prompt that incoming lines never break.

The article's client printed datagrams in the middle of whatever the person
was typing. Here prompt_toolkit owns the input line and ``patch_stdout``
prints every incoming line above it, redrawing the prompt and the half-typed
text underneath. Everything runs in one asyncio loop: the prompt, a reader on
the UDP socket, and a timer task that wakes at the session's next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.patch_stdout import patch_stdout

from chatd.client import EXIT_OK, EXIT_UNREACHABLE, net
from chatd.client.sanitize import safe_text
from chatd.client.session import (
    QUIT_WORDS,
    ClientSession,
    Closed,
    Event,
    Joined,
    Line,
    NoAnswer,
    NotSent,
    Refused,
    State,
    name_error,
)
from chatd.client.texts import status_text

#: Signals that leave the room politely instead of killing the client silently.
LEAVE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _ignore_mouse_reports(bindings: KeyBindings) -> KeyBindings:
    """``bindings``, taking every mouse report away from prompt_toolkit's own handler.

    The client never turns mouse reporting on, yet prompt_toolkit parses any
    ``ESC [ M`` or ``ESC [ <`` sequence as a mouse report, from a program that
    left reporting on or typed by hand, and its handler raises on codes it does
    not know (``ESC [ M x y z``: KeyError; ``ESC [ 5 M``: ValueError), which
    stops the prompt and loses the line being typed. Still so in 3.0.53
    (prompt-toolkit/python-prompt-toolkit#449): the application's own bindings
    take precedence over the default ones, so this one wins.
    """
    @bindings.add(Keys.Vt100MouseEvent)
    def _ignore(event: KeyPressEvent) -> None:
        pass

    return bindings


def run(link: net.Link, session: ClientSession, name: str | None,
        clock: Callable[[], float] = time.monotonic) -> int:
    """Log in (asking for a name unless given one), then chat; returns the exit status."""
    prompt: PromptSession[str] = PromptSession(key_bindings=_ignore_mouse_reports(KeyBindings()))
    while True:
        if name is None:
            try:
                wanted = prompt.prompt("your name: ")
            except EOFError:
                return EXIT_OK  # never joined, nothing to leave
            problem = name_error(wanted)
            if problem is not None:
                print(problem)
                continue
        else:
            wanted = name
        result = net.login(link, session, wanted, clock)
        if isinstance(result, Joined):
            break
        if isinstance(result, NoAnswer):
            print(f"chat-client: {net.no_answer_message(link.host, link.port)}", file=sys.stderr)
            return EXIT_UNREACHABLE
        assert isinstance(result, Refused)
        if name is not None:  # --name: nobody to ask again
            print(f"chat-client: {result.text}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(result.text)
    print(f"you are in the room as {result.name} (quit, /quit, Ctrl-D or Ctrl-C to leave)")
    return asyncio.run(_chat(link, session, result.name, prompt, clock))


async def _chat(link: net.Link, session: ClientSession, name: str,
                prompt: PromptSession[str], clock: Callable[[], float]) -> int:
    loop = asyncio.get_running_loop()
    sock = link.sock
    assert sock is not None
    finished = asyncio.Event()
    changed = asyncio.Event()  # the next deadline may have moved: re-arm the timer

    def pump(events: list[Event], rearm: bool = True) -> None:
        net.send_all(sock, session.take_datagrams())
        for event in events:
            text = event.text if isinstance(event, Line) else status_text(event)
            if text is not None:
                print(text)
            if isinstance(event, Closed):
                finished.set()
        if rearm:
            changed.set()

    def on_readable() -> None:
        events: list[Event] = []
        for data in net.receive_all(sock):
            events.extend(session.receive(data, clock()))
        pump(events)

    def leave() -> None:
        if session.state in (State.LEAVING, State.CLOSED):
            return
        pump(session.leave(clock()))
        if prompt.app.is_running and not prompt.app.future.done():
            prompt.app.exit(result="")

    async def timers() -> None:
        while session.state is not State.CLOSED:
            deadline = session.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event, and this loop never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
            changed.clear()
            pump(session.tick(clock()), rearm=False)

    bindings = _ignore_mouse_reports(KeyBindings())

    @bindings.add("enter")
    def _send(event: KeyPressEvent) -> None:
        # One prompt for the whole session, Enter sends without ending it: the
        # terminal stays in raw mode, so keys typed right after Enter (even
        # Ctrl-D) are never lost between two prompts.
        buffer = event.current_buffer
        text = buffer.text
        if text.strip() in QUIT_WORDS:
            buffer.reset()
            leave()
            return
        if not text:
            return
        try:
            session.say(text)
        except NotSent as exc:
            print(exc)  # the line stays in the buffer, to shorten or send later
            return
        buffer.reset(append_to_history=True)
        print(f"{name}> {safe_text(text)}")
        pump([])

    async def typing() -> None:
        with contextlib.suppress(EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
            await prompt.prompt_async(f"{name}> ", key_bindings=bindings)
        leave()  # nothing more when already leaving or closed

    with patch_stdout():
        loop.add_reader(sock.fileno(), on_readable)
        for signum in LEAVE_SIGNALS:
            loop.add_signal_handler(signum, leave)
        tasks = [asyncio.create_task(timers()), asyncio.create_task(typing())]
        try:
            await finished.wait()
        finally:
            if prompt.app.is_running and not prompt.app.future.done():
                prompt.app.exit(result="")
            await asyncio.wait([tasks[1]], timeout=1.0)  # let the prompt finish drawing
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for signum in LEAVE_SIGNALS:
                loop.remove_signal_handler(signum)
            loop.remove_reader(sock.fileno())
    return EXIT_OK
