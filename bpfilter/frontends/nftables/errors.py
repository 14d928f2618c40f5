"""The nftables front-end's error: the file, where in the JSON, and the unsupported token."""

from __future__ import annotations

from ..iptables.errors import ParseError


class NftParseError(ParseError):
    """Bad or unsupported nftables JSON: `file`, the JSON `location` (object index, rule, chain,
    handle, expression) and the offending `token`. A ParseError, so callers of either front-end
    catch one type."""

    def __init__(self, message: str, file: str = "<stdin>", location: str = "",
                 token: str | None = None, text: str = "") -> None:
        super().__init__(message, file, 0, token, None, text)
        self.location = location

    def __str__(self) -> str:
        out = f"{self.file}: {self.location}: {self.message}" if self.location else \
            f"{self.file}: {self.message}"
        if self.text:
            out += f" in {self.text}"
        return out


class Unsupported(Exception):
    """Raised inside one expression or statement; the reader adds the location. `token` names
    what is refused (an expression kind, a field, a value)."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.token = token
