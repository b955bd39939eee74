"""API keys, OpenAI-style (``Authorization: Bearer KEY``).

Two kinds:
- admin keys: everything that changes knowledge or configuration (documents, builds,
  jobs, reloading experiments or the router's classifier);
- client keys (optional): chat and the read-only endpoints. With none configured those
  stay open; an admin key is always accepted where a client key is.
``/health`` and ``/metrics`` are open (load balancers and Prometheus).

Keys come from ``KNOWMUX_ADMIN_KEY`` / ``KNOWMUX_API_KEYS`` (comma-separated) or a JSON
keys file (``KNOWMUX_KEYS_FILE``): ``{"admin": [{"name": "ops", "key": "..."}],
"clients": [{"name": "app", "key": "..."}]}`` (a bare string is a key named by its
position). With no admin key the server refuses to listen on anything but loopback.

A wrong key and a missing key get the same 401 body, and checking never stops at the
first mismatch: the presented key's SHA-256 is compared with every configured key's in
constant time, so timing tells nothing about which key, or which part of one, was close.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import Depends, Request

from ..errors import KnowmuxError
from .deps import get_runtime


class Unauthorized(KnowmuxError):
    type = "invalid_request_error"
    code = "invalid_api_key"


@dataclass(frozen=True)
class Principal:
    name: str  # recorded as documents' added_by
    admin: bool


class KeysError(ValueError):
    pass


def _entries(raw, kind: str) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raw = [raw]
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, key = f"{kind}-{i}", item
        elif isinstance(item, dict) and isinstance(item.get("key"), str):
            name, key = str(item.get("name") or f"{kind}-{i}"), item["key"]
        else:
            raise KeysError(f"keys file: {kind}[{i}] must be a key string or {{\"name\", \"key\"}}")
        if len(key) < 16:
            raise KeysError(f"keys file: {kind} key {name!r} is shorter than 16 characters")
        out.append((name, key))
    return out


class Keys:
    def __init__(self, admin: list[tuple[str, str]], clients: list[tuple[str, str]]):
        self._keys = [(hashlib.sha256(k.encode()).digest(), Principal(n, True)) for n, k in admin] + \
                     [(hashlib.sha256(k.encode()).digest(), Principal(n, False)) for n, k in clients]
        self.has_admin = bool(admin)
        self.has_clients = bool(clients)

    @classmethod
    def from_settings(cls, settings) -> "Keys":
        admin, clients = [], []
        if settings.admin_key:
            admin += _entries(settings.admin_key, "admin")
        if settings.api_keys:
            clients += _entries([k.strip() for k in settings.api_keys.split(",") if k.strip()], "client")
        if settings.keys_file is not None:
            try:
                data = json.loads(Path(settings.keys_file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise KeysError(f"keys file {settings.keys_file}: {e}") from None
            if not isinstance(data, dict) or set(data) - {"admin", "clients"}:
                raise KeysError(f"keys file {settings.keys_file}: expected {{\"admin\": [...], \"clients\": [...]}}")
            admin += _entries(data.get("admin"), "admin")
            clients += _entries(data.get("clients"), "client")
        return cls(admin, clients)

    def identify(self, token: Optional[str]) -> Optional[Principal]:
        digest = hashlib.sha256((token or "").encode()).digest()
        found = None
        for known, principal in self._keys:  # no early exit
            if hmac.compare_digest(digest, known) and found is None:
                found = principal
        return found


def bearer(request: Request) -> Optional[str]:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


_DENIED = ("Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'; "
           "this endpoint needs {what}.")


async def require_admin(request: Request, rt=Depends(get_runtime)) -> Principal:
    keys = rt.keys
    if not keys.has_admin:
        return Principal("local", True)  # only possible on loopback (checked at start-up)
    p = keys.identify(bearer(request))
    if p is None or not p.admin:
        raise Unauthorized(_DENIED.format(what="an admin key"))
    return p


async def require_client(request: Request, rt=Depends(get_runtime)) -> Principal:
    keys = rt.keys
    if not keys.has_clients:
        return Principal("anonymous", False)
    p = keys.identify(bearer(request))
    if p is None:
        raise Unauthorized(_DENIED.format(what="a client or admin key"))
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings, keys: Keys) -> None:
    """Refuse to serve the admin endpoints keyless on a non-loopback address."""
    if not keys.has_admin and not is_loopback(settings.host):
        raise ValueError(f"refusing to listen on {settings.host} with no admin key: anyone who can reach it could "
                         "rewrite the server's knowledge. Set KNOWMUX_ADMIN_KEY (or a keys file), or bind 127.0.0.1")
