"""Match and target kinds. Importing this package registers every entry in `REGISTRY`."""

from . import ip, targets, tcpudp  # noqa: F401  (registration side effects)
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, OptVal, TargetEntry

__all__ = ["REGISTRY", "Context", "MatchEntry", "MatchError", "OptVal", "Option", "TargetEntry"]
