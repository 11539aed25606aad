"""``python -m agentcluster.cli``: the same as the ``agentcluster`` script."""

from agentcluster.cli.main import app

app(prog_name="agentcluster")
