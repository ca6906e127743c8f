# tsjax developer entry points. `make test` works on a fresh machine that has python3 + pip and
# reaches PyPI: it builds .venv, pulls the catalog models (PyPI wheels) and runs pytest.

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
DEFAULT_MODEL = smollm2-135m
MODELS = smollm2-135m gemma3-270m
PORT ?= 5000
# loopback only; `make serve HOST=0.0.0.0` exposes the server (README, "Security")
HOST ?= 127.0.0.1

.PHONY: venv models converter browser serve test lint llama-cpp bench clean distclean

venv: $(STAMP)

# Reinstall only when pyproject.toml changes (or the venv is missing); the stamp records success.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# Instant when the models are already cached and verified (see tsjax/catalog.py).
models: venv
	@for m in $(MODELS); do \
		echo "tsjax pull $$m" >&2; \
		$(BIN)/tsjax pull $$m >/dev/null || exit 1; \
	done

# llama.cpp's HF -> GGUF converter (pinned llama-cpp-python sdist from PyPI, sha256-checked,
# unpacked beside the model cache) for the tiny random models of tests/hf_factory.py. Instant
# when cached; fails loudly when PyPI is unreachable.
converter: venv
	$(BIN)/python tests/converter.py fetch >/dev/null

# Headless Chromium for tests/test_webui_browser.py (Playwright drives Debian's build; its own
# browser download does not work here). Installed only as root; otherwise those tests skip.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "browser: /usr/bin/chromium missing and not root: the web UI browser tests will skip" >&2; \
	fi

serve: venv
	$(BIN)/tsjax pull $(DEFAULT_MODEL) >/dev/null
	$(BIN)/tsjax serve --host $(HOST) --port $(PORT)

# Test files run on TEST_WORKERS processes (pytest-xdist, one file per worker at a time so a
# module's server or model is built once): the suite is mostly single-threaded tracing and XLA
# compiles, so a second core halves it. Default: the cores, at most 4; TEST_WORKERS=0 runs one
# process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: venv models converter browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check .

# llama-cpp-python (the `bench` extra: llama.cpp in the same run as tsjax, and the tests' optional
# second reference) built portable: a -march=native build segfaults on tiny quantized models on
# AMX machines, and a build with instructions the CPU lacks dies with SIGILL. So: no native
# tuning, AVX2/FMA/F16C always (x86-64-v3), and the AVX512 variants only where /proc/cpuinfo
# lists them (for the AVX512 machines: -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
# -DGGML_AVX512_BF16=ON). Override with `make bench LLAMA_CMAKE_ARGS=...`.
CPU_FLAGS := $(shell grep -m1 -o -w -E 'avx512f|avx512_vnni|avx512_bf16' /proc/cpuinfo 2>/dev/null | sort -u)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	$(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) \
	$(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON)

llama-cpp: venv
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --no-cache-dir -e '.[bench]'

bench: venv models llama-cpp
	$(BIN)/tsjax bench

# Build and test leftovers; keeps .venv and the model cache (~/.cache/tsjax), which are slow
# to rebuild. `make distclean` also removes .venv.
clean:
	rm -rf .pytest_cache .ruff_cache build dist test-artifacts *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
