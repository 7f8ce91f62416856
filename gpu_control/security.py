"""Who may change a manager's state: the control token and the same-origin rule.

Reads (status, health, metrics) and generation stay open; every state-changing control
(offload, release, preheat, timeouts, offload-after-use, any per-model control) goes
through one `ControlAccess`, whichever interface it came from (REST, the Gradio API, MCP,
the UI's own events)::

    access = ControlAccess(token=read_control_token())
    access.authorize(request.headers)                # raises ControlLocked / ForeignOrigin
    access.authorize(request.headers, token=typed)   # the UI's password field

Nothing here imports a web framework: headers are any mapping of names to values.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ControlLocked, ForeignOrigin, InvalidSetting

__all__ = [
    "TOKEN_ENV",
    "ControlAccess",
    "excerpt",
    "is_loopback_host",
    "read_control_token",
]

TOKEN_ENV = "GPU_CONTROL_TOKEN"
"""The environment variable holding the control token."""

_MIN_TOKEN_CHARS = 8
_MAX_TOKEN_CHARS = 4096
_EXCERPT_CHARS = 60


def excerpt(value: Any, limit: int = _EXCERPT_CHARS) -> str:
    """A short, printable excerpt of a value a user sent, for error messages.

    ``repr`` of the value cut to ``limit`` characters with an ellipsis and the full length,
    so a 10 MB string is never echoed back whole.
    """
    try:
        text = repr(value)
    except ValueError:  # an int over 4300 digits has no repr
        return "a number with thousands of digits"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def read_control_token(
    environ: Mapping[str, str] | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The control token: from ``token_file`` when given, else ``GPU_CONTROL_TOKEN``; None when unset.

    A token file (a secret mounted by Docker or Kubernetes) holds the token on its first
    line; a byte-order mark, surrounding whitespace and any further lines are ignored. The
    token travels in an HTTP header, so it is printable ASCII without spaces.

    Raises:
        InvalidSetting: the file cannot be read; the token is empty (also a
            ``GPU_CONTROL_TOKEN`` that is set but blank, e.g. an empty secret: that must not
            leave control open), too short (under 8 characters) or too long, or holds spaces
            or characters outside printable ASCII.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        source = "--control-token-file"
        try:
            text = Path(token_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise InvalidSetting(f"{source} {excerpt(str(token_file))} cannot be read: {reason}.") from None
        lines = text.strip().splitlines()
        token = lines[0].strip() if lines else ""
    else:
        source = TOKEN_ENV
        if TOKEN_ENV not in env:
            return None
        token = env[TOKEN_ENV].strip()
    if not token:
        raise InvalidSetting(
            f"{source} is empty: give it a token "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), "
            f"or leave {TOKEN_ENV} unset to run without one."
        )
    if any(char.isspace() for char in token):
        raise InvalidSetting(f"{source} must be one word without spaces.")
    if not all(" " < char < "\x7f" for char in token):
        raise InvalidSetting(
            f"{source} must be printable ASCII (letters, digits, punctuation): "
            "it is sent in an HTTP header."
        )
    if not _MIN_TOKEN_CHARS <= len(token) <= _MAX_TOKEN_CHARS:
        raise InvalidSetting(
            f"{source} must be {_MIN_TOKEN_CHARS} to {_MAX_TOKEN_CHARS} characters long "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')."
        )
    return token


_HOST_HEADER = re.compile(r"^(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?$")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a ``Host`` header: a name or address, with an optional port) is this machine only.

    Only well-formed values count: ``localhost`` and ``*.localhost``, 127.0.0.0/8 and ``[::1]``
    (a bare ``::1`` too); anything else, malformed values included, is not loopback.
    """
    host = host.strip()
    try:
        if ipaddress.ip_address(host).is_loopback:  # a bare IPv6 address such as ::1
            return True
    except ValueError:
        pass
    match = _HOST_HEADER.match(host)
    if match is None:
        return False
    name = (match["ip6"] or match["name"]).rstrip(".").lower()
    if match["name"] and (name == "localhost" or name.endswith(".localhost")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _lower_keys(headers: Mapping[str, Any] | None) -> dict[str, str]:
    if headers is None:
        return {}
    return {str(key).lower(): str(value) for key, value in dict(headers).items()}


def _netloc(url: str) -> str | None:
    """``host:port`` of an absolute URL (default ports made explicit), lower case; None if not a URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname.lower()}:{port}"


def _host_netlocs(headers: dict[str, str]) -> set[str]:
    """The addresses the request was sent to: Host and any X-Forwarded-Host, with both default ports."""
    hosts = [headers.get("host", "")]
    hosts += headers.get("x-forwarded-host", "").split(",")
    found = set()
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        for scheme in ("http", "https"):
            netloc = _netloc(f"{scheme}://{host}")
            if netloc:
                found.add(netloc)
    return found


class ControlAccess:
    """Decides whether a request may change state.

    Args:
        token: the control token; None leaves control open to every same-origin request.
        allowed_origins: extra origins (``https://example.org``) allowed to send controls,
            e.g. a separate front end; the app's own origin is always allowed.
        local_only: without a token, accept controls only for requests addressed to this
            machine by a loopback name (``Host: localhost``, ``127.0.0.1``, ``[::1]``). Set it
            when the server listens on loopback: a web page that rebinds its own domain to
            127.0.0.1 (DNS rebinding) is then same-origin, but its requests carry its domain
            in ``Host``. With a token it changes nothing (the page cannot know the token).
    """

    def __init__(
        self, token: str | None = None, *, allowed_origins: tuple[str, ...] = (), local_only: bool = False
    ) -> None:
        self._token = token.encode("utf-8") if token else None
        self._origins = {netloc for netloc in (_netloc(origin) for origin in allowed_origins) if netloc}
        self._local_only = local_only

    def __repr__(self) -> str:
        return f"ControlAccess(locked={self.locked}, local_only={self._local_only})"

    @property
    def locked(self) -> bool:
        """Whether state-changing controls need the token."""
        return self._token is not None

    def origin_allowed(self, headers: Mapping[str, Any] | None) -> bool:
        """False when the request names an ``Origin`` that is not the app's own (nor allowed)."""
        lowered = _lower_keys(headers)
        if lowered.get("sec-fetch-site", "").strip().lower() in ("cross-site", "same-site"):
            # set by the browser, out of a page's reach: another site (or another port of this
            # host) sent it, whatever Origin and X-Forwarded-Host claim
            return False
        origin = lowered.get("origin")
        if origin is None:
            return True
        netloc = _netloc(origin)
        if netloc is None:  # "null" (sandboxed frames, file://) or garbage: never same-origin
            return False
        return netloc in self._origins or netloc in _host_netlocs(lowered)

    def token_ok(self, headers: Mapping[str, Any] | None, token: str | None = None) -> bool:
        """Whether the request carries the token (``Authorization: Bearer …`` or ``token``)."""
        if self._token is None:
            return True
        candidates = []
        if token:
            candidates.append(str(token).strip())
        authorization = _lower_keys(headers).get("authorization", "")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            candidates.append(credentials.strip())
        ok = False
        for candidate in candidates:
            # surrogatepass: a lone surrogate typed into the panel is a wrong token, not a crash
            ok |= hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), self._token)
        return ok

    def authorize(self, headers: Mapping[str, Any] | None, *, token: str | None = None) -> None:
        """Allow a state-changing request, or raise saying why not.

        Args:
            headers: the request's HTTP headers (any mapping; names are case-insensitive).
            token: a token typed by the user (the UI's password field), besides the header.

        Raises:
            ForeignOrigin: the request came from another site's page (its ``Origin``).
            ControlLocked: the app has a control token and the request did not carry it.
        """
        if not self.origin_allowed(headers):
            raise ForeignOrigin(
                "Refused: this control request came from another site's page (its Origin is not this app's)."
            )
        host = _lower_keys(headers).get("host")  # None only for calls made inside the process
        if self._local_only and self._token is None and host is not None and not is_loopback_host(host):
            raise ForeignOrigin(
                "Refused: without a control token this app takes GPU controls only at a loopback "
                f"address (localhost, 127.0.0.1), not at {excerpt(host)}; "
                f"set {TOKEN_ENV} to control it under another name."
            )
        if not self.token_ok(headers, token):
            raise ControlLocked(
                "GPU control is locked: send the control token (Authorization: Bearer <token>, "
                "or the token field of the GPU panel). Status and generation stay open."
            )
