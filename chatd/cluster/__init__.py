"""One room across several nodes, on Redis: loaded only when ``cluster.redis`` is set.

:mod:`chatd.cluster.records` is the contract between the Redis side
(:mod:`chatd.cluster.link`, threads that alone touch Redis) and the loop's side
(:mod:`chatd.cluster.bridge`, which turns the room's steps into records and
other nodes' records into deliveries).
"""
