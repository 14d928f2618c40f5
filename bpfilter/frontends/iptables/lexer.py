"""Split an iptables-restore line into arguments the way iptables-restore does.

Arguments are separated by blanks; a double quote opens a quoted part in which blanks are kept
and a backslash escapes the next character; the closing quote ends the argument. A `#` starts
a comment only at the beginning of a line (the caller skips such lines).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_WORD = re.compile(r"[^ \t\r\n]+")


class Token(NamedTuple):
    """One argument and the (1-based) column where it starts in its line."""

    # A named tuple rather than a frozen dataclass: a 100,000-rule file makes a million.
    text: str
    column: int


class LexError(ValueError):
    """A line that cannot be split (an unterminated quote)."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


def tokenize(line: str, offset: int = 0) -> list[Token]:
    """The arguments of `line`; `offset` is added to columns (for a stripped prefix)."""
    if '"' not in line:  # the common case: no quoting, arguments are runs of non-blanks
        return [Token(m.group(), offset + m.start() + 1) for m in _WORD.finditer(line)]
    tokens: list[Token] = []
    buf: list[str] = []
    start: int | None = None
    quote_at = -1
    in_quote = escaped = False
    for i, c in enumerate(line):
        if in_quote:
            if escaped:
                buf.append(c)
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                # The closing quote ends the argument, even an empty one.
                tokens.append(Token("".join(buf), offset + start + 1))
                buf, start, in_quote = [], None, False
            else:
                buf.append(c)
            continue
        if c == '"':
            in_quote, quote_at = True, i
            if start is None:
                start = i
        elif c in " \t\r\n":
            if buf:
                tokens.append(Token("".join(buf), offset + start + 1))
                buf, start = [], None
        else:
            if start is None:
                start = i
            buf.append(c)
    if in_quote:
        raise LexError("unterminated quote", offset + quote_at + 1)
    if buf:
        tokens.append(Token("".join(buf), offset + start + 1))
    return tokens
