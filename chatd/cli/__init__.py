"""Command-line front ends: argument parsing, exit codes and human output only."""
