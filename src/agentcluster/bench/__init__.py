"""Benchmarks behind ``agentcluster bench <name> --json`` (one JSON object on stdout)."""
