"""The GPU Dockerfile cannot be built on the CPU-only machines; it is linted instead."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_serves_with_the_vllm_engine_and_a_key_from_the_environment():
    text = (ROOT / "Dockerfile").read_text()
    assert "KNOWMUX_ENGINE=vllm" in text and 'ENTRYPOINT ["knowmux", "serve"]' in text
    assert "KNOWMUX_ADMIN_KEY=" not in text.replace("-e KNOWMUX_ADMIN_KEY=...", "")  # never baked into the image


def test_the_compose_file_runs_two_replicas_over_one_store_and_one_tier():
    """compose.yaml (never run here: no Docker, no GPU): both replicas name the same
    PostgreSQL store and object-store tier, wait for them, and keep their own data volume."""
    import yaml

    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())
    replicas = {k: v for k, v in spec["services"].items() if k.startswith("knowmux")}
    assert len(replicas) == 2
    envs = [r["environment"] for r in replicas.values()]
    for key in ("KNOWMUX_STORE", "KNOWMUX_KV_TIER", "KNOWMUX_TENSOR_PARALLEL_SIZE"):
        assert envs[0][key] == envs[1][key], key
    assert envs[0]["KNOWMUX_STORE"].startswith("postgresql://") and envs[0]["KNOWMUX_KV_TIER"].startswith("s3://")
    assert all(r["depends_on"]["postgres"]["condition"] == "service_healthy" for r in replicas.values())
    data = [next(v for v in r["volumes"] if v.endswith(":/data")) for r in replicas.values()]
    assert len(set(data)) == 2  # each replica's own caches
    assert spec["services"]["postgres"]["image"].startswith("postgres:15")
    conf = spec["configs"]["nginx"]["content"]
    assert all(f"server {name}:8000" in conf for name in replicas)
