"""The ``agentcluster`` command line."""
