"""chatd: a pluggable UDP group-chat daemon."""

__version__ = "0.1.0"
