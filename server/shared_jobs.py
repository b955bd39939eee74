"""Build jobs shared by replicas: records in PostgreSQL, claimed by whichever replica is idle.

With ``--store postgresql://...`` every replica serves the same documents, so a build
submitted through one may run on any. A job is a row of ``knowmux_jobs`` (its record
as JSON, its status, the replica that holds it and that replica's last heartbeat, all
in the database's clock). Each replica runs one claimer thread:

    SELECT ... WHERE status = 'queued' OR (status = 'running' AND heartbeat + lease < now)
    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED

so two idle replicas never take the same job, and a job whose replica died (SIGKILL,
power, network) is taken over once its lease runs out (``--job-lease-s`` of the replica
that held it, default 30 s; a heartbeat thread renews it every lease / 3 while the job
runs). A graceful stop hands the job back at once. The new holder starts
at the job's ``done`` count: what was built stays built (artefacts are content-addressed
in the shared tier), the group in flight when the replica died is redone, nothing
acknowledged is lost. A replica only claims the kinds its engine can build.

Every progress write is conditional on still holding the job (``owner`` = this replica,
``status`` = running): a replica that lost its lease (stalled past it) or whose job was
cancelled through another replica stops before its next group and cannot overwrite the
new holder's record. Between groups the holder reads the row back (one query a group).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict
from typing import Callable, Optional

from indexes.pgstore import SCHEMA_LOCK, PgConnection, StoreUnavailable

from .jobs import JOB_ID, Builder, Job, JobManager

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS knowmux_jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    record JSONB NOT NULL,
    owner TEXT,
    heartbeat DOUBLE PRECISION,
    lease DOUBLE PRECISION,  -- the holder's lease in seconds: its own setting judges it
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS knowmux_jobs_claim ON knowmux_jobs (status, created_at);
"""
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


class SharedJobManager(JobManager):
    def __init__(self, url: str, lease_s: float = 30.0, poll_s: float = 0.5):
        super().__init__(None)
        self.db = PgConnection(url)
        self.lease_s, self.poll_s = float(lease_s), float(poll_s)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._current: Optional[Job] = None
        self._threads: list[threading.Thread] = []
        with self.db.tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cur.execute(_SCHEMA)

    # -- the API's calls ------------------------------------------------------------------
    def submit(self, kind: str, doc_ids: list[str], build: Builder) -> Job:
        """Queue a job in the shared store; returns once it is committed. Any replica
        that can build ``kind`` may run it (this one's ``build`` is not kept)."""
        job = Job(f"job-{uuid.uuid4().hex[:12]}", kind, list(doc_ids))
        with self.db.tx() as cur:
            cur.execute("INSERT INTO knowmux_jobs (id, kind, status, record, created_at) VALUES (%s, %s, %s, %s, %s)",
                        (job.id, kind, job.status, json.dumps(asdict(job)), job.created_at))
        self._wake.set()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        if not JOB_ID.match(job_id):
            return None
        with self.db.tx() as cur:
            return _read(cur, job_id)

    def recent(self, limit: int = 20) -> list[Job]:
        with self.db.tx() as cur:
            cur.execute("SELECT record FROM knowmux_jobs ORDER BY created_at DESC, id DESC LIMIT %s", (limit,))
            return [j for j in (_job(r[0]) for r in cur.fetchall()) if j is not None]

    def cancel(self, job_id: str) -> Optional[Job]:
        if not JOB_ID.match(job_id):
            return None
        with self.db.tx() as cur:
            job = _read(cur, job_id, for_update=True)
            if job is None:
                return None
            if job.status in ("queued", "running"):
                job.status = "cancelled"
                job.finished_at = job.finished_at or time.time()  # the record's clock, as its other times
                cur.execute("UPDATE knowmux_jobs SET status = %s, record = %s WHERE id = %s",
                            (job.status, json.dumps(asdict(job)), job.id))
        return job

    def resume(self, builder: Callable[[str], Builder]) -> list[Job]:
        """Start claiming: queued jobs, and jobs whose replica stopped renewing its lease,
        of the kinds ``builder`` can build here. Returns [] (claims come later, logged)."""
        from .artefacts import KINDS

        kinds = []
        for kind in KINDS:
            try:
                builder(kind)
                kinds.append(kind)
            except Exception as e:
                log.info("this replica does not build %s (%s): other replicas may", kind, e)
        if kinds:
            for target, name in ((self._claim_loop, "claims"), (self._heartbeat_loop, "heartbeat")):
                t = threading.Thread(target=target, args=(builder, kinds) if target == self._claim_loop else (),
                                     name=f"knowmux-jobs-{name}", daemon=True)
                t.start()
                self._threads.append(t)
        return []

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Stop after the group in flight and hand the job back (queued, at its ``done``
        count) for any replica to take; if this process dies instead, the lease runs out."""
        self._closing.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=wait_s)
        self.db.close()

    # -- claiming and running -------------------------------------------------------------
    def _claim_loop(self, builder: Callable[[str], Builder], kinds: list[str]) -> None:
        while not self._closing.is_set():
            try:
                job = self._claim(kinds)
            except StoreUnavailable as e:
                log.warning("claiming build jobs: %s", e)
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            log.info("%s build %s claimed at document %d of %d (resumed %d times)", job.kind, job.id, job.done,
                     len(job.doc_ids), job.resumed)
            self._current = job
            try:
                self._run(job, builder(job.kind), job.done)
            except StoreUnavailable as e:  # lost the store mid-job: the lease runs out, someone resumes
                log.warning("%s build %s stopped: %s", job.kind, job.id, e)
            except Exception:
                log.exception("%s build %s failed", job.kind, job.id)
            finally:
                self._current = None
            if self._closing.is_set() and job.status == "running":
                self._release(job)

    def _release(self, job: Job) -> None:
        """Shutting down mid-job: hand the job back at once rather than after the lease."""
        try:
            with self.db.tx() as cur:
                cur.execute("UPDATE knowmux_jobs SET status = 'queued', owner = NULL, heartbeat = NULL, "
                            "record = jsonb_set(jsonb_set(record, '{status}', '\"queued\"'), '{worker}', 'null') "
                            "WHERE id = %s AND owner = %s AND status = 'running'", (job.id, self.owner))
            log.info("%s build %s handed back at document %d of %d", job.kind, job.id, job.done, len(job.doc_ids))
        except StoreUnavailable as e:
            log.warning("handing back %s: %s (another replica takes it after the lease)", job.id, e)

    def _claim(self, kinds: list[str]) -> Optional[Job]:
        with self.db.tx() as cur:
            cur.execute(f"SELECT record, status FROM knowmux_jobs WHERE kind = ANY(%s) AND (status = 'queued' OR "
                        f"(status = 'running' AND heartbeat + lease < {_NOW})) ORDER BY created_at LIMIT 1 "
                        "FOR UPDATE SKIP LOCKED", (kinds,))
            row = cur.fetchone()
            if row is None:
                return None
            job = _job(row[0])
            if row[1] == "running" or job.started_at is not None:  # its replica died, or handed it back
                job.resumed += 1
            job.status, job.worker = "running", self.owner
            cur.execute(f"UPDATE knowmux_jobs SET status = 'running', owner = %s, heartbeat = {_NOW}, lease = %s, "
                        "record = %s WHERE id = %s", (self.owner, self.lease_s, json.dumps(asdict(job)), job.id))
        return job

    def _heartbeat_loop(self) -> None:
        while not self._closing.wait(self.lease_s / 3):
            job = self._current
            if job is None:
                continue
            try:
                with self.db.tx() as cur:
                    cur.execute(f"UPDATE knowmux_jobs SET heartbeat = {_NOW} WHERE id = %s AND owner = %s "
                                "AND status = 'running'", (job.id, self.owner))
            except StoreUnavailable as e:
                log.warning("renewing the lease of %s: %s", job.id, e)

    def _stopped(self, job: Job) -> bool:
        """Cancelled through any replica, or taken over by another (this one stalled past
        its lease)."""
        with self.db.tx() as cur:
            cur.execute("SELECT status, owner FROM knowmux_jobs WHERE id = %s", (job.id,))
            row = cur.fetchone()
        if row is None or row[0] == "cancelled":
            job.status = "cancelled"
            return True
        if row[1] != self.owner:
            log.warning("%s build %s was taken over by %s", job.kind, job.id, row[1])
            return True
        return False

    def _save(self, job: Job) -> None:
        """Write the record while this replica holds the job (else nothing: cancelled or
        taken over); a finished job releases it."""
        with self.db.tx() as cur:
            cur.execute(f"UPDATE knowmux_jobs SET status = %s, record = %s, heartbeat = {_NOW} "
                        "WHERE id = %s AND owner = %s AND status = 'running'",
                        (job.status, json.dumps(asdict(job)), job.id, self.owner))


def _read(cur, job_id: str, for_update: bool = False) -> Optional[Job]:
    """The job's record (locked for this transaction with ``for_update``); None when there
    is no such job or its record is unreadable."""
    cur.execute("SELECT record FROM knowmux_jobs WHERE id = %s" + (" FOR UPDATE" if for_update else ""), (job_id,))
    row = cur.fetchone()
    return _job(row[0]) if row else None


def _job(record) -> Optional[Job]:
    try:
        return Job(**(record if isinstance(record, dict) else json.loads(record)))
    except (TypeError, ValueError) as e:
        log.warning("ignoring an unreadable job record: %s", e)
        return None
