"""Match and target kinds. Importing this package registers every entry in `REGISTRY`."""

from . import (  # noqa: F401  (registration side effects)
    conntrack,
    icmp,
    ip,
    mangle,
    misc,
    multiport,
    nat,
    packet,
    ratelimit,
    sets,
    targets,
    tcpudp,
    xtargets,
)
from .registry import (
    REGISTRY,
    Context,
    MatchEntry,
    MatchError,
    Option,
    OptVal,
    TargetEntry,
    Unsupported,
)

__all__ = ["REGISTRY", "Context", "MatchEntry", "MatchError", "OptVal", "Option", "TargetEntry",
           "Unsupported"]
