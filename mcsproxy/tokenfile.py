"""A bearer token kept in a file (`--serve-token-file`, `--controlplane-token-file`).

The controller's stream and /status carry every imported service and endpoint of the
clusterset. Beside the NetworkPolicy in deploy/, the controller can demand a shared
token and the gateway send it. The file is read again whenever its modification time or
size changes, so a token rotated in a mounted Secret applies without a restart (the
kubelet swaps the file in place). Reading is a stat per use: uses are one per stream
connection or /status request, never per byte."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

MAX_TOKEN_BYTES = 4096


class TokenFileError(OSError):
    """The token file cannot be read, is empty or is too large."""


class TokenFile:
    __slots__ = ("_seen", "_token", "path")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of what _token holds
        self._token = ""
        self.token()  # a missing or empty file is an error at start, not at first use

    def token(self) -> str:
        """The current token (surrounding whitespace and the trailing newline dropped)."""
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size)
            if seen != self._seen:
                if st.st_size > MAX_TOKEN_BYTES:
                    raise TokenFileError(f"token file {self.path}: larger than "
                                         f"{MAX_TOKEN_BYTES} bytes")
                token = self.path.read_text(encoding="utf-8").strip()
                if not token or any(c.isspace() for c in token):
                    raise TokenFileError(f"token file {self.path}: empty, or holds whitespace")
                self._token, self._seen = token, seen
        except TokenFileError:
            raise
        except (OSError, UnicodeError) as exc:
            raise TokenFileError(f"token file {self.path}: {exc}") from None
        return self._token

    def authorization(self) -> str:
        """The Authorization header value a client sends."""
        return f"Bearer {self.token()}"

    def admits(self, authorization: str | None) -> bool:
        """Whether a request's Authorization header carries the token (constant time)."""
        if authorization is None or not authorization.startswith("Bearer "):
            return False
        try:
            expected = self.token()
        except TokenFileError:
            return False  # no readable token: nobody is admitted
        return hmac.compare_digest(authorization[7:].strip().encode(), expected.encode())
