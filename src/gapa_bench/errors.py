"""Errors of the benchmark harness; all are :class:`gapa.GAPAError` too."""

from __future__ import annotations

from gapa.errors import ConfigurationError, GAPAError


class DataError(GAPAError, ValueError):
    """A data file is missing, malformed or lacks required columns."""


class NotApplicableError(ConfigurationError):
    """A benchmark method cannot run on this backbone (e.g. all-weights KFAC Laplace on a
    ResNet); the benchmark reports and skips it."""


class ReportError(GAPAError, ValueError):
    """A marker or a record file the report cannot use; the message names the file and line."""
