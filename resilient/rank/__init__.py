"""The rank protocol: the public library a training script uses to be supervised by resilient.

    from resilient.rank import Phase, RankEnv, StopFlag, connect

    env = RankEnv.from_environ()        # who am I (torchrun-compatible variables)
    beat = connect(env)                 # heartbeats to the supervisor; a null client when unsupervised
    stop = StopFlag().install(env)      # the supervisor's (and the scheduler's) stop request
    beat.send(Phase.STEP, step, loss=loss, step_time=dt)
    ...
    sys.exit(ExitCode.PREEMPTED if stop.requested else ExitCode.FINISHED)

See docs/rank-protocol.md. Depends only on resilient.core.
"""

from resilient.core.exit_codes import ExitCode
from resilient.rank.env import RankEnv, node_name
from resilient.rank.heartbeat import Fields, Heartbeat, HeartbeatClient, NullHeartbeat, Phase, connect
from resilient.rank.orphan import die_with_parent
from resilient.rank.stop import StopFlag

__all__ = [
    "ExitCode",
    "Fields",
    "Heartbeat",
    "HeartbeatClient",
    "NullHeartbeat",
    "Phase",
    "RankEnv",
    "StopFlag",
    "connect",
    "die_with_parent",
    "node_name",
]
