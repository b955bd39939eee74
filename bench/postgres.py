"""A throwaway PostgreSQL server for the tests and bench.replicas: initdb into a folder,
listen on loopback at a free port, trust authentication, stopped at the end (the folder
is the caller's to remove).

Debian's postgresql-15 binaries (``make test`` installs them where they are missing).
PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql-15; make test does)")
    return found[-1]


class Postgres:
    def __init__(self, folder: Path, port: int):
        self.folder, self.port = Path(folder), port
        self.data = self.folder / "pgdata"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def start(self) -> "Postgres":
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            os.chmod(self.folder, 0o700)
            for parent in self.folder.parents:  # the owner must reach its folder
                if parent == Path("/") or (parent.stat().st_mode & 0o001):
                    break
                os.chmod(parent, parent.stat().st_mode | 0o001)
        subprocess.run(self._as_owner([_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                                       "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]),
                       check=True, capture_output=True)
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=50")
        subprocess.run(self._as_owner([_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                                       str(self.folder / "log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True)
        return self

    def stop(self) -> None:
        subprocess.run(self._as_owner([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server (one of that name is dropped first); its URL."""
        return _fresh_database(self.url, name)

    def wait(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.time() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)


class External:
    """A server someone else runs (``--store URL``): databases are made on it, it is not stopped."""

    def __init__(self, url: str):
        self.url = url

    def fresh_database(self, name: str) -> str:
        return _fresh_database(self.url, name)

    def stop(self) -> None:
        pass


def external(url: str) -> External:
    return External(url)


def _fresh_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
