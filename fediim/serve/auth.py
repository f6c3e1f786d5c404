"""Who may call the service: the bearer token from the site TOML's ``[serve]`` table, and
the rule that without one the service listens on a loopback address only."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import stat

from fediim.errors import SiteConfigError
from fediim.protocol.site_config import ServeSettings

__all__ = ["MIN_TOKEN_LENGTH", "authorized", "check_binding", "is_loopback", "load_token"]

#: Shortest token accepted (characters): long enough not to be guessed.
MIN_TOKEN_LENGTH = 16


def load_token(settings: ServeSettings) -> str | None:
    """The bearer token of ``settings`` (None when neither source is set).

    The token file must be readable by its owner only (like an SSH key); the environment
    variable must be set. Either way a token shorter than :data:`MIN_TOKEN_LENGTH` is
    refused."""
    if settings.token_file is not None:
        path = settings.token_file
        try:
            mode = path.stat().st_mode
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SiteConfigError(f"{path}: cannot read the serve token ({exc.strerror})") \
                from None
        if stat.S_IMODE(mode) & 0o077:
            raise SiteConfigError(f"{path}: the serve token is readable by others (mode "
                                  f"{stat.S_IMODE(mode):o}); chmod 600 it")
        source = str(path)
    elif settings.token_env is not None:
        token = os.environ.get(settings.token_env, "").strip()
        source = f"environment variable {settings.token_env}"
        if not token:
            raise SiteConfigError(f"{source} (serve.token_env) is not set")
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise SiteConfigError(f"{source}: the serve token has {len(token)} characters; use at "
                              f"least {MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if token is None and not is_loopback(host):
        raise SiteConfigError(f"refusing to serve on {host} without a token: set "
                              "[serve] token_file or token_env in the site TOML, or listen "
                              "on 127.0.0.1")


def authorized(header: str | None, token: str | None, *, allow_basic: bool = False) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always, without a token):
    ``Bearer <token>``, or with ``allow_basic`` (the status page, for a browser's own
    prompt) ``Basic`` with the token as the password."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        presented = credentials.strip()
    elif scheme.lower() == "basic" and allow_basic:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        presented = decoded.partition(":")[2]
    else:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))
