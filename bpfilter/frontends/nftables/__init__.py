"""The nftables front-end: libnftables JSON (`nft -j list ruleset`) → one IR Ruleset per family."""

from .errors import NftParseError
from .reader import looks_like_json, parse

__all__ = ["NftParseError", "looks_like_json", "parse"]
