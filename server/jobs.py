"""Background build jobs (KV caches, adapters), one at a time, in order.

A job walks its documents, skipping what is already built (builds are keyed by content,
so doing a document twice costs a lookup). Model work goes through the engine thread
between steps, so serving keeps going while a job runs.

Job records are written to ``DATA_DIR/jobs/{id}.json`` (atomically) when submitted and
after every group of documents (one for KV caches, ``adapter_build_group`` for
adapters, whose augmentation and training run together). A server that dies mid-job
(crash, SIGKILL, power) finds the unfinished records when it starts again and resumes
them: what was built stays built, the group in flight is redone, nothing else is lost.
A cancelled job stops before its next group (the group in flight finishes and what it
built is kept) and is never resumed.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from indexes.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")


class Builder:
    """Builds one kind of artefact for documents, ``group`` at a time: ``build(doc_ids)``
    returns per document True (built now), False (already stored) or the exception that
    failed it. A job runs its documents in groups, so a crash redoes at most one group."""

    def __init__(self, build: Callable[[list[str]], list], group: int = 1):
        self.build, self.group = build, max(1, group)

    def __call__(self, doc_ids: list[str]) -> list:
        return self.build(doc_ids)


def build_ids(service, kb, doc_ids: list[str]) -> list:
    """Build the documents ``doc_ids`` (fetched in one query) with ``service``: per id True
    (built now), False (already stored, or the id repeated) or the exception that failed
    it, ``LookupError`` for a document no longer stored."""
    docs = kb.get_many(list(dict.fromkeys(doc_ids)))
    live = [i for i in dict.fromkeys(doc_ids) if i in docs]
    built = dict(zip(live, build_each(service, [docs[i] for i in live])))
    out, seen = [], set()
    for i in doc_ids:
        out.append(False if i in seen else built.get(i, LookupError("the document was deleted before its build")))
        seen.add(i)
    return out


def outcome(result) -> str:
    """What one document's build result means: "failed", "built" or "skipped" (stored already)."""
    return "failed" if isinstance(result, BaseException) else "built" if result else "skipped"


def build_each(service, docs: list) -> list:
    """``service.build_documents(docs)`` when the service builds groups, else
    ``build_document`` per document; exceptions are returned in place, not raised."""
    if hasattr(service, "build_documents"):
        try:
            return service.build_documents(docs)
        except Exception as e:  # the group failed as a whole (e.g. training)
            return [e] * len(docs)
    out: list = []
    for doc in docs:
        try:
            out.append(service.build_document(doc))
        except Exception as e:
            out.append(e)
    return out


@dataclass
class Job:
    id: str
    kind: str  # "kv" | "adapters"
    doc_ids: list[str]
    status: str = "queued"  # queued | running | done | failed | cancelled
    done: int = 0
    built: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    resumed: int = 0  # times picked up again after a restart
    worker: Optional[str] = None  # the replica running it (a shared store: server.shared_jobs)

    def view(self) -> dict:
        d = asdict(self)
        d["total"] = len(self.doc_ids)
        d.pop("doc_ids")
        elapsed = (self.finished_at or time.time()) - self.started_at if self.started_at else 0.0
        d["seconds_per_built_doc"] = round(elapsed / self.built, 4) if self.built else None
        d["object"] = "job"
        return d


class JobManager:
    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="knowmux-jobs")
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def submit(self, kind: str, doc_ids: list[str], build: Builder) -> Job:
        """Queue a job; returns once its record is on disk (so it survives a crash)."""
        job = Job(f"job-{uuid.uuid4().hex[:12]}", kind, list(doc_ids))
        self._save(job)
        with self._lock:
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, build)
        return job

    def get(self, job_id: str) -> Optional[Job]:
        if not JOB_ID.match(job_id):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None and self.folder is not None:  # finished before a restart: still reportable
            job = self._read(self.folder / f"{job_id}.json")
        return job

    def recent(self, limit: int = 20) -> list[Job]:
        """The newest ``limit`` jobs, this process's and those recorded by earlier ones."""
        with self._lock:
            jobs = dict(self._jobs)
        if self.folder is not None:
            for path in self.folder.glob("job-*.json"):
                if path.stem not in jobs:
                    job = self._read(path)
                    if job is not None:
                        jobs[job.id] = job
        return sorted(jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)[:limit]

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued or running job (None: no such job). A running job stops before
        its next group. ``Job.status`` says whether it was cancelled or had already ended."""
        job = self.get(job_id)
        if job is None:
            return None
        with self._lock:
            if job.status in ("queued", "running"):
                job.status = "cancelled"
                job.finished_at = job.finished_at or time.time()
                self._save(job)
        return job

    def resume(self, builder: Callable[[str], Builder]) -> list[Job]:
        """Pick up the jobs a previous process left unfinished. ``builder(kind)`` gives the
        build function of a kind (or raises if this server cannot build it)."""
        if self.folder is None:
            return []
        out = []
        for path in sorted(self.folder.glob("job-*.json"), key=lambda p: p.stat().st_mtime):
            job = self._read(path)
            if job is None or job.status not in ("queued", "running"):
                continue
            try:
                build = builder(job.kind)
            except Exception as e:  # e.g. an engine that cannot build this kind
                job.status, job.finished_at = "failed", time.time()
                job.errors.append({"doc_id": None, "error": f"not resumable here: {e}"})
                self._save(job)
                continue
            job.status, job.resumed = "queued", job.resumed + 1
            self._save(job)
            with self._lock:
                self._jobs[job.id] = job
            self._pool.submit(self._run, job, build, job.done)
            out.append(job)
            log.info("resuming %s build %s at document %d of %d", job.kind, job.id, job.done, len(job.doc_ids))
        return out

    def _run(self, job: Job, build: Builder, start: int = 0) -> None:
        with self._lock:
            if job.status == "cancelled":  # cancelled while queued
                return
            job.status = "running"
            job.started_at = job.started_at or time.time()
            self._save(job)
        todo = job.doc_ids[start:]
        for g in range(0, len(todo), build.group):
            if self._closing.is_set():  # shutting down: the record stays "running" and resumes next start
                return
            if self._stopped(job):
                log.info("%s build %s stopped (%s) after %d of %d documents", job.kind, job.id, job.status,
                         job.done, len(job.doc_ids))
                return
            group = todo[g:g + build.group]
            try:
                results = build(group)
            except Exception as e:  # the whole group failed
                results = [e] * len(group)
            if self._closing.is_set() and any(outcome(r) == "failed" for r in results):
                return  # failed because we are shutting down: redo the group on resume
            for doc_id, result in zip(group, results):
                what = outcome(result)
                if what == "failed":  # one bad document does not stop the job
                    log.warning("%s build of %s failed: %s", job.kind, doc_id, result)
                    job.errors.append({"doc_id": doc_id, "error": f"{type(result).__name__}: {result}"})
                elif what == "built":
                    job.built += 1
                else:
                    job.skipped += 1
                job.done += 1
            with self._lock:
                self._save(job)
        with self._lock:
            if job.status == "cancelled":  # during the last group
                return
            job.status = "failed" if job.errors and not job.built and not job.skipped else "done"
            job.finished_at = time.time()
            self._save(job)

    def _stopped(self, job: Job) -> bool:
        """Whether a running job must stop before its next group: it was cancelled."""
        return job.status == "cancelled"

    def _save(self, job: Job) -> None:
        if self.folder is not None:
            atomic_write_bytes(self.folder / f"{job.id}.json", json.dumps(asdict(job)).encode())

    @staticmethod
    def _read(path: Path) -> Optional[Job]:
        try:
            return Job(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring unreadable job record %s: %s", path.name, e)
            return None

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Stop after the group in flight; unfinished jobs resume at the next start."""
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in list(getattr(self._pool, "_threads", ())):
            t.join(timeout=wait_s)
