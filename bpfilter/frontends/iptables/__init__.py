"""The iptables / ip6tables front-end: iptables-restore text → IR, IR → iptables-save text."""

from .errors import ParseError
from .parser import parse, parse_rule_args
from .saver import rule_text, save

__all__ = ["ParseError", "parse", "parse_rule_args", "rule_text", "save"]
