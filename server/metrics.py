"""Prometheus metrics, one registry per app (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        # every request series carries strategy, experiment and arm ("" outside experiments),
        # so two arms compare in Prometheus without log mining
        arm = ["strategy", "experiment", "arm"]
        self.requests = Counter("knowmux_requests", "Chat requests by strategy, experiment, arm and HTTP status",
                                [*arm, "status"], registry=r)
        self.errors = Counter("knowmux_request_errors", "Failed chat requests by strategy, experiment, arm and code",
                              [*arm, "code"], registry=r)
        self.latency = Histogram("knowmux_request_latency_seconds", "End-to-end chat latency",
                                 arm, buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("knowmux_time_to_first_token_seconds", "Time to first token",
                              arm, buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("knowmux_tokens", "Tokens by strategy, experiment, arm and kind (prompt, completion)",
                              [*arm, "kind"], registry=r)
        self.routes = Counter("knowmux_routes", "Strategies chosen by `auto` and experiments, by deciding rule",
                              ["strategy", "rule"], registry=r)
        self.queue = Gauge("knowmux_queue_length", "Requests waiting for a place in the batch", registry=r)
        self.running = Gauge("knowmux_running_batch_size", "Requests in the running batch", registry=r)
        self.step_tokens = Histogram("knowmux_step_tokens", "Tokens per engine forward step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.step_seconds = Histogram("knowmux_step_seconds", "Duration of one engine step",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self.documents = Gauge("knowmux_documents", "Documents in the store", registry=r)
        self.gemm_kernel = Gauge("knowmux_gemm_kernel", "GEMM kernel the torch engine timed fastest at start (1), "
                                 "by weight shape (out x in) and row bucket (up to that many rows)",
                                 ["shape", "rows", "kernel"], registry=r)

    def failed(self, labels: tuple[str, str, str], status: int, code: str) -> None:
        self.requests.labels(*labels, str(status)).inc()
        self.errors.labels(*labels, code or "error").inc()

    def on_step(self, tokens: int, rows: int, seconds: float) -> None:
        self.step_tokens.observe(tokens)
        self.step_seconds.observe(seconds)

    def bind_engine(self, engine) -> None:
        self.queue.set_function(lambda: engine.stats()["queue"])
        self.running.set_function(lambda: engine.stats()["running"])
        # the start-up kernel choice sets decode speed and depends on the CPU: visible per
        # server, so two machines (or two restarts) can be compared (torch engine only)
        from .engine.kernels import ROW_BUCKETS

        for (out_f, in_f), per_bucket in (getattr(getattr(engine, "runner", None), "kernels", None) or {}).items():
            for rows, kernel in zip(ROW_BUCKETS, per_bucket):
                self.gemm_kernel.labels(f"{out_f}x{in_f}", str(rows), kernel).set(1)
