"""The control channel: how a local admin reaches the daemon, and nobody else does.

``chatctl`` (:mod:`chatd.control.client`) connects to the control socket
that the admin child (:mod:`chatd.admin`) serves; the child checks the peer
(:mod:`chatd.control.peers`), bounds the request and relays it to the
daemon over a socketpair, where :mod:`chatd.commands` executes it. The
socket and the FIFO are made and removed by :mod:`chatd.control.files`;
every hop speaks JSON lines (:mod:`chatd.control.channel`). Request
``{"cmd": "say", "args": {"text": "hi"}}``; answer ``{"ok": true, "result":
...}`` or ``{"ok": false, "error": "..."}``. On the socketpair the child adds
an ``"id"`` that the daemon echoes back, and ``{"event": ...}`` lines say
what the child does (``ready``, ``error``) and keep its heartbeat (``ping``,
``pong``).
"""
