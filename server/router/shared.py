"""The router classifier in the shared tier, so that every replica routes with the same one.

    knowmux router publish DIR --kv-tier URL     # after knowmux router train --out DIR

puts the classifier's two files in the tier's ``router/`` namespace under names that
carry their content's sha256, then ``current.json`` naming them (written last: a replica
reads either the old classifier or the new one, never half of each). A replica with
``--kv-tier`` fetches the current classifier into its classifier folder when it starts
and at ``POST /v1/router/reload``, checking both files' sha256 before it writes them;
a damaged object or an unreachable tier leaves the local classifier as it was (logged,
and reported in ``/v1/router``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from indexes.atomic import atomic_write_bytes

from .classifier import META, WEIGHTS, ClassifierError, RouterClassifier

log = logging.getLogger(__name__)

POINTER = "current.json"
NAMESPACE = "router"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(folder: Path, tier) -> str:
    """Put the classifier in ``folder`` in the tier as the current one; its digest.
    ClassifierError when the folder holds no usable classifier."""
    folder = Path(folder)
    if RouterClassifier.load(folder) is None:
        raise ClassifierError(f"no router classifier in {folder} (knowmux router train --out {folder})")
    files = {name: (folder / name).read_bytes() for name in (WEIGHTS, META)}
    digests = {name: _sha(data) for name, data in files.items()}
    for name, data in files.items():
        tier.put(f"{digests[name][:32]}-{name}", data)
    digest = _sha("".join(digests[n] for n in (WEIGHTS, META)).encode())
    tier.put(POINTER, json.dumps({"digest": digest, "files": digests}).encode())
    return digest


def fetch(tier, folder: Path) -> Optional[str]:
    """Bring the tier's current classifier into ``folder`` (unchanged when it is there
    already); its digest, or None when the tier holds none. ValueError for a damaged one."""
    raw = tier.get(POINTER)
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
        digests, digest = pointer["files"], pointer["digest"]
        assert set(digests) == {WEIGHTS, META}
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{POINTER} in the tier is not a classifier pointer") from None
    folder = Path(folder)
    if all((folder / n).exists() and _sha((folder / n).read_bytes()) == d for n, d in digests.items()):
        return digest
    files = {}
    for name, want in digests.items():
        data = tier.get(f"{want[:32]}-{name}")
        if data is None or _sha(data) != want:
            raise ValueError(f"the tier's {name} of classifier {digest[:12]} is missing or damaged (sha256)")
        files[name] = data
    folder.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, META):  # the loader reads both; they are replaced together under the router's reload
        atomic_write_bytes(folder / name, files[name])
    return digest


def main(argv=None) -> int:
    from ..tiers import open_tier

    ap = argparse.ArgumentParser(prog="knowmux router publish",
                                 description="put a trained router classifier in the shared tier, for every replica")
    ap.add_argument("folder", type=Path, help="the classifier folder (knowmux router train --out)")
    ap.add_argument("--kv-tier", required=True, help="the replicas' --kv-tier: file:///dir or s3://bucket/prefix")
    a = ap.parse_args(argv)
    try:
        digest = publish(a.folder, open_tier(a.kv_tier, NAMESPACE))
    except (ClassifierError, ValueError, OSError) as e:
        print(f"knowmux router publish: {e}", file=sys.stderr)
        return 2
    print(f"published router classifier {digest[:12]} to {a.kv_tier}; POST /v1/router/reload on each replica "
          "(or restart them) to use it")
    return 0
