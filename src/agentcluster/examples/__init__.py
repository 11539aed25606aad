"""Bundled examples (run by ``agentcluster up``)."""
