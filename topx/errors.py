"""The project's error hierarchy.

Every error a user can cause is a ``TopxError``; the CLI prints its message and exits non-zero
without a traceback. Step Functions ``Retry``/``Catch`` clauses match on these class names.
"""

from __future__ import annotations


class TopxError(Exception):
    """Base of every error topx raises on purpose."""


class InputDataError(TopxError):
    """Input data is malformed. Carries the file, the 1-based row and the column at fault."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.column = column
        self.reason = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


class ArtifactFormatError(TopxError):
    """A model artifact or parameter file is not in a format topx can read."""


class ConfigError(TopxError):
    """A hyperparameter, option or environment setting is invalid."""


class StoreError(TopxError):
    """Reading or writing the recommendations store failed."""
