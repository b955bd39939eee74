"""A knowmux server on the tiny test model in its own process (for kill -9 tests):
python -m tests.serve_tiny DATA_DIR PORT"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import uvicorn

    from server.api.app import create_app
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    data_dir, port = sys.argv[1], int(sys.argv[2])
    rt = Runtime.build(Settings.from_env(env={}, data_dir=data_dir, port=port), engine=tiny_engine())
    uvicorn.run(create_app(runtime=rt), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
