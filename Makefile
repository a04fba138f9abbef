# make test  — install into .venv (once) and run the test suite
# make demo  — install into .venv (once), train adamw/galore/plumage/optimal/haar/gum on configs/demo.yaml, compare, plot
# make quality — the same estimators over 5 seeds, each at its best LR (benchmarks/quality.py)
# make quality-ladder — the same at widths 256 and 384 (docs/quality.md §10; ~14 h on 2 cores)
#
# Works on a fresh machine with python3.11+, pip and gcc. torch is installed first and
# pinned, so pip never resolves an unpinned torch (that would fetch CUDA wheels).

PYTHON_BOOT ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
# .venv/bin first on PATH, so tests that call the real launchers (deepspeed, torchrun) find them;
# DeepSpeed JIT-builds its CPU comm op once per venv (not into the shared ~/.cache)
RUN         := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" TORCH_EXTENSIONS_DIR="$(CURDIR)/$(VENV)/torch_extensions"
TORCH_PIN   ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_CONFIG ?= configs/demo.yaml
DEMO_OUT    ?= runs/demo
DEMO_ESTIMATORS ?= adamw galore plumage optimal haar gum
# Each estimator at its own best matrix LR from the quality harness (docs/quality.md §9: demo model,
# 300 steps, swept over 5 seeds, every estimator's dense parameters at the config's dense_lr);
# `DEMO_LRS=` runs them all at the config's one lr instead.
DEMO_LRS    ?= adamw=1e-3 galore=2e-3 plumage=2e-3 haar=4e-3 gum=1.6e-2 optimal=2e-3
DEMO_ARGS   ?=

QUALITY_ARGS ?=

.PHONY: install test demo plot bench quality quality-ladder clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,hf,deepspeed,data,plot]'
	touch $@

test: $(VENV)/.installed
	$(RUN) $(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[plot]'
	@for est in $(DEMO_ESTIMATORS); do \
	  lr=$$(for kv in $(DEMO_LRS); do case $$kv in $$est=*) echo "--set optimizer.lr=$${kv#*=}";; esac; done); \
	  echo "== $$est $$lr"; \
	  $(RUN) $(PY) -m plumage_ds train --config $(DEMO_CONFIG) --out $(DEMO_OUT)/$$est --overwrite \
	    --set optimizer.estimator=$$est $$lr $(DEMO_ARGS) || exit $$?; \
	done
	$(PY) -m plumage_ds compare $(addprefix $(DEMO_OUT)/,$(DEMO_ESTIMATORS))
	$(PY) -m plumage_ds plot $(addprefix $(DEMO_OUT)/,$(DEMO_ESTIMATORS)) --out $(DEMO_OUT)/demo.png

# Plot finished runs: make plot RUNS='runs/demo/adamw runs/demo/plumage' PLOT_OUT=runs/plot.png
RUNS     ?= $(addprefix $(DEMO_OUT)/,$(DEMO_ESTIMATORS))
PLOT_OUT ?= $(DEMO_OUT)/demo.png
plot: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[plot]'
	$(PY) -m plumage_ds plot $(RUNS) --out $(PLOT_OUT)

# The side-by-side benchmarks of docs/benchmarks.md (about an hour on 2 cores, at nice 10, one thread
# per process); the longer knob sweep is `$(PY) benchmarks/sweep_lowrank.py --config configs/sweep.yaml`,
# the SVD/eigh timing of 4096-wide gradients `$(PY) benchmarks/bench_refresh.py --skip-ranks --spectral
# 4096x4096 4096x11008`, and the GPU check `benchmarks/gpu_check.sh` (CUDA machine).
BENCH := $(RUN) OMP_NUM_THREADS=1 nice -n 10 $(PY)
bench: $(VENV)/.installed
	$(BENCH) benchmarks/bench_data_parallel.py
	$(RUN) DS_ACCELERATOR=cpu $(PY) benchmarks/bench_deepspeed.py --stages 1 2 --hidden 128 --steps 10
	$(RUN) $(PY) benchmarks/bench_comm_hook.py
	$(BENCH) benchmarks/bench_hot_path.py
	$(BENCH) benchmarks/bench_memory.py
	$(BENCH) benchmarks/bench_refresh.py
	$(BENCH) benchmarks/bench_scale.py

# Training quality over seeds (docs/quality.md): every estimator at its own best LR, gap closed
# per seed, loss curves. Resumable (finished runs are reused); hours on 2 cores at 600 steps.
quality: $(VENV)/.installed
	$(RUN) $(PY) benchmarks/quality.py --config $(DEMO_CONFIG) --out runs/quality --steps 600 --seeds 5 --sweep-seeds 5 --jobs 2 $(QUALITY_ARGS)

# The scale ladder (docs/quality.md §10): widths 256 and 384, both corpora, 3 seeds, the default optimal at every
# width (128 too, with its dense LR swept), the mechanism arms at 384, then Haar at 384 on prose and at 128
# (benchmarks/quality_ladder.sh; resumable, ~14 h on 2 cores). The GPU point is benchmarks/gpu_quality.sh (one CUDA device, < 9 min).
quality-ladder: $(VENV)/.installed
	$(RUN) PYTHON=$(PY) bash benchmarks/quality_ladder.sh

clean-runs:
	rm -rf runs
