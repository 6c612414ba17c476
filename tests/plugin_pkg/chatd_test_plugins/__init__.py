"""Plugins used by chatd's tests; see tests/test_plugins.py."""
