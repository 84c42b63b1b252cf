"""Implementations of the offline CLI subcommands (thin: parse, call the pure core, print)."""
