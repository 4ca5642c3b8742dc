"""Exceptions shared by every layer (imports nothing else from concord)."""

from __future__ import annotations


class ConcordError(RuntimeError):
    """Base class of concord's own errors."""


class UsageError(ConcordError, ValueError):
    """Bad user input (unknown name, bad count, missing file); the CLI exits 2 on it."""


class PeerTimeoutError(ConcordError, TimeoutError):
    """A peer did not answer in time. The message names the peer and what was awaited."""


class ProtocolError(ConcordError):
    """A wire message was malformed, unauthenticated or unexpected."""
