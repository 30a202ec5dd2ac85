"""Bearer tokens: the admin token may call anything, the read token only reads."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from server._grpc._status import PermissionDeniedError, UnauthenticatedError

__all__ = ["TokenAuth"]

Metadata = Sequence[tuple[str, str | bytes]]


class TokenAuth:
    """Checks ``authorization: Bearer <token>`` metadata against the configured tokens.

    With no token configured nothing is checked (every caller is
    ``"anonymous"``); tokens are compared in constant time.
    """

    def __init__(self, admin_token: str | None, read_token: str | None) -> None:
        self._admin = admin_token.encode() if admin_token else None
        self._read = read_token.encode() if read_token else None

    @property
    def enabled(self) -> bool:
        return self._admin is not None or self._read is not None

    def role(self, metadata: Metadata | None) -> str:
        """``"admin"``, ``"read"`` or ``"anonymous"`` (no token configured);
        raises :class:`UnauthenticatedError` for missing, malformed or wrong tokens."""
        if not self.enabled:
            return "anonymous"
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise UnauthenticatedError(
                "missing credentials: send metadata 'authorization: Bearer <token>'"
            )
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError(
                "malformed authorization metadata: expected 'Bearer <token>'"
            )
        given = token.strip().encode()
        if self._admin is not None and hmac.compare_digest(given, self._admin):
            return "admin"
        if self._read is not None and hmac.compare_digest(given, self._read):
            return "read"
        raise UnauthenticatedError("invalid token")

    @staticmethod
    def authorize(role: str, method: str, mutating: bool) -> None:
        """Raises :class:`PermissionDeniedError` for a mutating call with the read token."""
        if mutating and role == "read":
            raise PermissionDeniedError(
                f"{method} changes the service: it needs the admin token, not the read token"
            )
