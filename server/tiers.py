"""A second storage tier that several server replicas share: built artefacts are written
there as well as locally, and a replica that misses locally fetches from there.

Selected by URL (``--kv-tier``, KNOWMUX_KV_TIER):

- ``file:///shared/knowmux`` (or a plain path): a directory on a shared filesystem;
  objects are written under a temporary name and renamed, so a reader sees a whole
  object or none.
- ``s3://bucket/prefix?endpoint_url=http://minio:9000&region=us-east-1``: an
  S3-compatible object store (AWS S3, MinIO, Ceph, moto), through boto3 (``pip install
  boto3``). Credentials come from boto3's usual places (AWS_ACCESS_KEY_ID, profiles,
  instance roles); an S3 PUT is atomic per object.

A tier stores opaque, content-addressed objects by name: the caller (server.kv.store)
checks what it reads, so a damaged object is refused there. A tier that cannot be
reached is logged and treated as a miss, never as an error of the request.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

from indexes.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


class Tier:
    url: str

    def get(self, name: str) -> Optional[bytes]:
        """The object's bytes, or None when it is not there."""
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError


class DirectoryTier(Tier):
    def __init__(self, root: Path, namespace: str = ""):
        self.root = Path(root) / namespace if namespace else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def get(self, name: str) -> Optional[bytes]:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self._path(name), data)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return self._path(name).exists()


class S3Tier(Tier):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, client=None):
        if client is None:
            try:
                import boto3
            except ImportError:
                raise ValueError("an s3:// tier needs boto3 (pip install boto3)") from None
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _missing(self, exc) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def get(self, name: str) -> Optional[bytes]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except Exception as e:  # botocore's ClientError; imported lazily with boto3
            if self._missing(e):
                return None
            raise

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise


def call(tier: Optional[Tier], op: str, name: str, *args, label: str = "tier"):
    """``tier.<op>(name, *args)`` for a store that uses a tier (server.kv.store, adapters.bank):
    None without a tier, and a tier that fails (network, permissions, the object store's own
    errors) is logged and counts as a miss, never as a failed request."""
    if tier is None:
        return None
    try:
        return getattr(tier, op)(name, *args)
    except Exception as e:
        log.warning("%s %s: %s %s failed: %s: %s", label, tier.url, op, name[:12], type(e).__name__, e)
        return None


def open_tier(url: Optional[str], namespace: str = "") -> Optional[Tier]:
    """The tier a URL names (None for None or ""); ``namespace`` separates what different
    stores keep in one tier (e.g. "kv"). ValueError for a URL it cannot serve."""
    if not url:
        return None
    u = urlparse(url)
    if u.scheme in ("", "file"):
        if u.netloc not in ("", "localhost"):
            raise ValueError(f"a file tier is a local path (file:///dir), got {url!r}")
        return DirectoryTier(Path(u.path), namespace)
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(f"an s3 tier names its bucket: s3://bucket/prefix, got {url!r}")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(q) - {"endpoint_url", "region"}
        if unknown:
            raise ValueError(f"unknown s3 tier option(s) {', '.join(sorted(unknown))}; known: endpoint_url, region")
        prefix = "/".join(p for p in (u.path.strip("/"), namespace) if p)
        return S3Tier(u.netloc, prefix, q.get("endpoint_url"), q.get("region"))
    raise ValueError(f"unknown tier {url!r}: use file:///dir or s3://bucket/prefix")
