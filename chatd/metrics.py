"""The daemon's status as Prometheus metrics: one status snapshot in, exposition text out.

Whoever renders asks the daemon for ``chatctl status`` (:meth:`chatd.server.Server.status`)
and turns that dict into text here, outside the daemon: the admin child for the HTTP
endpoint (:mod:`chatd.metrics_http`), ``chatctl`` for ``chatctl metrics``. The daemon's
loop only ever builds the status dict, as it does for ``chatctl status``.

Names follow Prometheus' conventions: ``chatd_`` first, base units (seconds, bytes),
``_total`` on counters. Every counter of ``status["counters"]`` is exported, those
without a name of their own as ``chatd_<counter>_total``, so a counter added to the
daemon shows up here without a change. The process metrics (``process_*``, the
standard names) are the daemon's, read from ``/proc/<pid>`` of ``status["pid"]``.
The table of every metric is docs/metrics.md.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector

from chatd import __version__

#: what the text is, for an HTTP Content-Type
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: counters of ``status["counters"]`` with a name and help of their own; each is exported
#: even before the daemon first counted it (as 0), so rate() works from the first scrape
NAMED_COUNTERS: Mapping[str, tuple[str, str]] = {
    "datagrams_in": ("chatd_datagrams_received", "Datagrams read from the UDP socket."),
    "datagrams_out": ("chatd_datagrams_sent", "Datagrams the kernel took for sending."),
    "chat_lines": ("chatd_chat_lines", "Chat lines said in the room (C, /me)."),
    "loop_stalls": ("chatd_loop_stalls", "Times the loop stood still for more than a second "
                    "(SIGSTOP, a slow reload, a starved host)."),
    "internal_errors": ("chatd_internal_errors", "Datagrams or service calls that raised; "
                        "the room went on."),
}

#: help of the counters that have no name of their own but are known today
COUNTER_HELP: Mapping[str, str] = {
    "evicted_idle": "Silent sessions evicted to make room for a login into a full room.",
    "cookies_issued": "Address cookies handed out (answers to H).",
    "unverified_capped": "Replies left out because an unverified session gets at most one "
                         "datagram back per datagram.",
    "backlogged": "Datagrams that waited for a full send buffer before going out.",
    "unreachable_reports": "ICMP errors read from the socket's error queue.",
}

_NOT_IN_NAME = re.compile(r"[^a-zA-Z0-9_]")


def render(status: Mapping[str, Any], *, process: bool = True) -> bytes:
    """The exposition text (format 0.0.4) of one status snapshot.

    ``process``: add the daemon's process metrics, read from ``/proc/<status["pid"]>``
    (what the reader may not read, such as another user's open file descriptors, is
    left out).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    pid = status.get("pid")
    if process and isinstance(pid, int):
        registry.register(ProcessCollector(pid=lambda: pid, registry=None))
    return generate_latest(registry)


class StatusCollector:
    """A prometheus_client collector over one status snapshot, taken before it is asked."""

    def __init__(self, status: Mapping[str, Any]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        yield _gauge("chatd_build_info", "chatd's version; always 1.", 1,
                     labels={"version": __version__})
        yield from _optional_gauge("chatd_users", "Users logged in to this node.",
                                   status.get("users"))
        yield from _optional_gauge("chatd_max_users", "Most users the room takes "
                                   "(room.max_users).", status.get("max_users"))
        yield from _optional_gauge("chatd_uptime_seconds", "Seconds since the daemon started.",
                                   status.get("uptime"))
        yield from _optional_gauge("chatd_start_time_seconds", "When the daemon started, in "
                                   "seconds since the epoch.", _epoch(status.get("started")))
        yield from _optional_gauge("chatd_backlog_datagrams", "Datagrams waiting for room in "
                                   "the socket's send buffer.", status.get("backlog"))
        yield from self._counters(_mapping(status.get("counters")))
        yield _labelled(CounterMetricFamily, "chatd_dropped_datagrams",
                        "Datagrams (and ICMP reports) the room threw away, by reason.",
                        "reason", _mapping(status.get("drops")))
        yield _labelled(CounterMetricFamily, "chatd_send_errors",
                        "Datagrams not sent, by errno (and backlog_full, lost_at_shutdown).",
                        "errno", _mapping(status.get("send_errors")))
        yield from _optional_counter("chatd_kernel_drops", "Datagrams the kernel dropped for "
                                     "the UDP socket (a full receive buffer), per "
                                     "/proc/net/udp.", status.get("kernel_drops"))
        yield from _optional_counter("chatd_log_write_errors", "Log lines that could not be "
                                     "written (a full disk, an unwritable file).",
                                     status.get("log_write_errors"))
        yield from _optional_counter("chatd_admin_child_restarts", "Admin children started "
                                     "after the first (one died or hung).",
                                     status.get("admin_child_restarts"))
        plugins = status.get("plugins")
        if isinstance(plugins, list):
            yield _labelled(GaugeMetricFamily, "chatd_plugin_enabled",
                            "Plugins switched on; always 1.", "plugin",
                            {str(name): 1 for name in plugins})
        cluster = status.get("cluster")
        if isinstance(cluster, Mapping):
            yield from _cluster(cluster)

    def _counters(self, counters: Mapping[str, Any]) -> Iterator[Metric]:
        taken = set()
        for key, (name, help_text) in NAMED_COUNTERS.items():
            taken.add(name)
            yield CounterMetricFamily(name, help_text, value=_number(counters.get(key)) or 0)
        for key in sorted(counters):
            value = _number(counters[key])
            name = "chatd_" + _NOT_IN_NAME.sub("_", str(key)).removesuffix("_total")
            if key in NAMED_COUNTERS or value is None or name in taken:
                continue
            taken.add(name)
            yield CounterMetricFamily(name, COUNTER_HELP.get(key, f"The daemon's {key} counter."),
                                      value=value)


def _cluster(cluster: Mapping[str, Any]) -> Iterator[Metric]:
    """The ``cluster`` section: the Redis link's status, nodes and users of the whole room."""
    info = {key: str(cluster[key]) for key in ("node", "room") if key in cluster}
    if info:
        yield _gauge("chatd_cluster_info", "This node's cluster name and room; always 1.", 1,
                     labels=info)
    connected = cluster.get("redis_connected")
    if isinstance(connected, bool):
        yield _gauge("chatd_cluster_redis_connected", "1 while the node is connected to "
                     "Redis, else 0.", int(connected))
    for key, name, help_text in (
            ("reconnects", "chatd_cluster_redis_reconnects", "Times the node connected to Redis "
             "again after losing it."),
            ("published", "chatd_cluster_records_published", "Records this node added to the "
             "room's stream."),
            ("received", "chatd_cluster_records_received", "Records of other nodes this node "
             "read from the room's stream."),
            ("dropped_outbox", "chatd_cluster_outbox_dropped_records", "Records dropped "
             "because the outbox was full while Redis was unreachable."),
            ("gaps", "chatd_cluster_stream_gaps", "Times records were trimmed from the stream "
             "before this node read them.")):
        yield from _optional_counter(name, help_text, cluster.get(key))
    yield from _optional_gauge("chatd_cluster_outbox_records", "Records waiting to be sent to "
                               "Redis.", cluster.get("outbox"))
    yield from _optional_gauge("chatd_cluster_lag_seconds", "Age of the newest record read "
                               "from the room's stream.", cluster.get("lag_seconds"))
    nodes = cluster.get("nodes")
    alive = _number(cluster.get("nodes_alive"))
    if isinstance(nodes, Mapping):
        up = {str(node): int(bool(_mapping(state).get("alive"))) for node, state in nodes.items()}
        yield _labelled(GaugeMetricFamily, "chatd_cluster_node_up", "1 for each node of the room "
                        "that is alive (its heartbeat is fresh), 0 for one that is not.",
                        "node", up)
        if alive is None:
            alive = sum(up.values())
    yield from _optional_gauge("chatd_cluster_nodes_alive", "Nodes of the room that are alive.",
                               alive)
    users = cluster.get("users_total", cluster.get("users"))
    yield from _optional_gauge("chatd_cluster_users", "Users logged in to the room, on every "
                               "node.", users)


# -- small pieces ----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A number of the status as a sample value; None for anything else (booleans too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _epoch(iso: Any) -> float | None:
    """``2026-11-30T15:04:05Z`` (chatd.formats.iso_time) as seconds since the epoch."""
    if not isinstance(iso, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _gauge(name: str, help_text: str, value: float,
           labels: Mapping[str, str] | None = None) -> Metric:
    if not labels:
        return GaugeMetricFamily(name, help_text, value=value)
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _optional_gauge(name: str, help_text: str, value: Any) -> Iterator[Metric]:
    number = _number(value)
    if number is not None:
        yield GaugeMetricFamily(name, help_text, value=number)


def _optional_counter(name: str, help_text: str, value: Any) -> Iterator[Metric]:
    number = _number(value)
    if number is not None:
        yield CounterMetricFamily(name, help_text, value=number)


def _labelled(kind: type, name: str, help_text: str, label: str,
              values: Mapping[str, Any]) -> Metric:
    family = kind(name, help_text, labels=[label])
    for key in sorted(values):
        number = _number(values[key])
        if number is not None:
            family.add_metric([str(key)], number)
    return family
