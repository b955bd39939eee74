"""Background build jobs (KV caches now; adapters later), one at a time, in order.

A job walks its documents, skipping what is already built (builds are keyed by content,
so a job interrupted by a crash resumes by being submitted again). Model work goes
through the engine thread between steps, so serving keeps going while a job runs.
Job records live in memory: a restart forgets them, not what they built.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    kind: str  # "kv"
    doc_ids: list[str]
    status: str = "queued"  # queued | running | done | failed
    done: int = 0
    built: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None

    def view(self) -> dict:
        d = asdict(self)
        d["total"] = len(self.doc_ids)
        d.pop("doc_ids")
        elapsed = (self.finished_at or time.time()) - self.started_at if self.started_at else 0.0
        d["seconds_per_built_doc"] = round(elapsed / self.built, 4) if self.built else None
        d["object"] = "job"
        return d


class JobManager:
    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="knowmux-jobs")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, kind: str, doc_ids: list[str], build_one: Callable[[str], bool]) -> Job:
        """build_one(doc_id) -> True if it built something, False if it was already there."""
        with self._lock:
            job = Job(f"job-{next(self._ids)}-{int(time.time())}", kind, list(doc_ids))
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, build_one)
        return job

    def get(self, job_id: str) -> Optional[Job]:
        return self._jobs.get(job_id)

    def _run(self, job: Job, build_one) -> None:
        job.status, job.started_at = "running", time.time()
        for doc_id in job.doc_ids:
            try:
                if build_one(doc_id):
                    job.built += 1
                else:
                    job.skipped += 1
            except Exception as e:  # one bad document does not stop the job
                log.warning("%s build of %s failed: %s", job.kind, doc_id, e)
                job.errors.append({"doc_id": doc_id, "error": f"{type(e).__name__}: {e}"})
            job.done += 1
        job.status = "failed" if job.errors and not job.built and not job.skipped else "done"
        job.finished_at = time.time()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
