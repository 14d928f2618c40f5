"""The front-end's error: it names the file, the line and the offending token."""

from __future__ import annotations


class ParseError(ValueError):
    """Bad or unsupported input: `file`:`line`, the offending `token` and its `column`."""

    def __init__(self, message: str, file: str = "<stdin>", line: int = 0,
                 token: str | None = None, column: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.token = token
        self.column = column
        self.text = text

    def __str__(self) -> str:
        out = f"{self.file}:{self.line}: {self.message}"
        if self.text:
            out += f' in "{self.text}"'
        return out


class RuleError(Exception):
    """An error inside one line; the caller adds file and line (`token` may be None)."""

    def __init__(self, message: str, token: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.token = token
