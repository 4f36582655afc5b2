"""The error that ends a command on an unhealthy node (exit code UNHEALTHY_NODE)."""

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode


class UnhealthyNodeError(ResilientError):
    """A health check on this node was fatal; the message is the verdict naming node and check."""

    exit_code = ExitCode.UNHEALTHY_NODE
    label = "unhealthy node"
