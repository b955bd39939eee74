"""A knowmux server on the tiny test model in its own process (for kill -9 tests):
python -m tests.serve_tiny DATA_DIR PORT"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = ("KNOWMUX_STORE", "KNOWMUX_JOB_LEASE_S", "KNOWMUX_KV_TIER", "KNOWMUX_ADAPTER_BUILD_GROUP")


def main() -> None:
    from server.api.app import create_app
    from server.cli import serve_app
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    data_dir, port = sys.argv[1], int(sys.argv[2])
    shared = {k: v for k, v in os.environ.items() if k in SHARED}  # replicas over one store and tier
    rt = Runtime.build(Settings.from_env(env=shared, data_dir=data_dir, port=port), engine=tiny_engine())
    if os.environ.get("KNOWMUX_TEST_BREAK_ENGINE"):  # the engine thread dies at its first request
        def broken_step():
            raise RuntimeError("simulated engine crash")

        rt.engine.worker.step = broken_step
    app = create_app(runtime=rt, exit_on_engine_death=True)
    serve_app(app, "127.0.0.1", port, "warning")
    sys.exit(1 if app.state.engine_died else 0)


if __name__ == "__main__":
    main()
