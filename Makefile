# Two commands on a fresh clone:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles from source (~4 min on 2 cores). The wheel is built
# once into this cache and reused by every later install on the machine.
WHEELS ?= $(HOME)/.cache/slipway/wheels
LLAMA  := llama-cpp-python==0.3.36
# Portable CPU build: -march=native picked AVX-512/AMX kernels that crashed on
# these virtual machines; AVX2/FMA runs everywhere we deploy and is as fast here.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# `make install CUDA=1`: llama.cpp with its CUDA backend (needs nvcc), cached apart from the CPU wheel.
# Run `make clean-venv` first if .venv already holds the CPU build. Measured: BENCHMARKS.md, "GPU".
ifeq ($(CUDA),1)
WHEELS := $(WHEELS)-cuda
LLAMA_CMAKE_ARGS += -DGGML_CUDA=ON
endif
PROJECT ?= ticket-triage

.PHONY: demo test install llama-wheel browser promtool ssh-keygen lint clean-venv walkthrough

demo: install
	$(BIN)/slipway validate $(PROJECT)
	$(BIN)/slipway models pull $(PROJECT)
	$(BIN)/slipway check $(PROJECT)

test: install browser promtool
	$(BIN)/slipway models pull $(PROJECT) --model tiny
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@$(MAKE) --no-print-directory ssh-keygen
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(MAKE) llama-wheel
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) "$(LLAMA)" -e ".[dev]"
	touch $@

llama-wheel:
	@mkdir -p $(WHEELS)
	@if ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then \
	    echo "llama-cpp-python wheel cached in $(WHEELS)"; \
	else \
	    echo "building llama-cpp-python from source (once per machine, ~4 min on 2 cores)"; \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-cache-dir --no-deps \
	        -w $(WHEELS) "$(LLAMA)"; \
	fi

# Signatures (approve, deploy, check, build) are made by OpenSSH's ssh-keygen, as git signs commits.
ssh-keygen:
	@command -v ssh-keygen >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing Debian's openssh-client (ssh-keygen signs approvals and deploys)"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-client >/dev/null; \
	    else \
	        echo "error: ssh-keygen not found; install OpenSSH (e.g. sudo apt-get install openssh-client)" >&2; exit 1; \
	    fi; }

# The report tests open pages in a real headless Chromium (Debian's package; Playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing Debian's chromium for the browser tests"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else \
	        echo "note: no chromium found; browser tests will be skipped (sudo apt-get install chromium)"; \
	    fi; }

# The alert-rule tests check slipway/alerts.yml with promtool (Debian's prometheus package) and replay
# synthetic metrics through the rules; without it they check the file's structure only.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing Debian's prometheus (for promtool) for the alert-rule tests"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	            prometheus >/dev/null; \
	    else \
	        echo "note: no promtool found; alert-rule tests check structure only (sudo apt-get install prometheus)"; \
	    fi; }

# README "Review and release": two versions, review page, approve, deploy, serve prod, roll back, audit.
walkthrough: install
	$(BIN)/slipway models pull $(PROJECT)
	bash docs/walkthrough.sh

lint: install
	$(BIN)/ruff check framework tests bench

clean-venv:
	rm -rf $(VENV)
