# Two commands on a fresh clone: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install assets test lint run playground

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	touch $(STAMP)

# The coding agents the tests drive (npm packages, pinned in tests/integration/agents.py), llama.cpp's GGUF
# converter (tests/llama_converter.py), the wheels the image's install script takes (tests/deploy/wheelhouse.py)
# and OpenAI's cl100k_base vocabulary LangChain tokenizes with (tests/integration/cl100k.py) go to a cache
# directory, so that `make test` runs them without a network.
install: $(STAMP)
	$(PY) -m tests.llama_converter
	$(PY) -m tests.deploy.wheelhouse
	$(PY) -m tests.integration.cl100k
ifneq ($(shell command -v npm),)
	$(PY) -m tests.integration.agents
endif

assets: $(STAMP)
	$(VENV)/bin/qwen-serve-assets

# two workers, a test file each at a time (pytest-xdist; tests/conftest.py shares the cores out among them)
test: install assets
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# serving needs the project and the embedded model, not what the tests cache
run: $(STAMP) assets
	$(VENV)/bin/qwen-serve --host 127.0.0.1 --port 8000

# The chat page's bundle (server/playground/static, committed) rebuilt from its sources and package-lock.json.
playground:
	cd server/playground && npm ci --no-audit --no-fund && npm run build
