# exdrop: Excitation Dropout on Caffe prototxts. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; override (e.g. TORCH_SPEC='torch>=2.4') to pick another build.
TORCH_SPEC ?= torch==2.13.0

# train-cifar10 knobs
VARIANT  ?= ed
# RECIPE=authors (the *_authors variants: the authors' training script, SGD, gaussian 0.01, raw pixels; the
# default: it puts CNN-2's fc1 in the paper's dense regime, README "Does it reproduce?") or paper (the paper's
# text: Adam, msra, pixels / 256)
RECIPE   ?= authors
recipe_suffix = $(if $(filter authors,$(RECIPE)),_authors,$(if $(filter paper,$(RECIPE)),,$(error RECIPE=$(RECIPE): paper or authors)))
# sweeps and benches run the paper's recipe unless RECIPE is given (its *_authors variants exist for CIFAR-10 only)
given_recipe = $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),paper)
given_suffix = $(if $(filter authors,$(given_recipe)),_authors)
SOLVER   ?= prototxt/cnn2/cifar10/solver_$(VARIANT)$(recipe_suffix).prototxt
DATA     ?= data/cifar-10-python.tar.gz
DATA_DIR ?= data/cifar10
MAX_ITER ?=
OUT      ?= models/cnn2_cifar10_$(VARIANT)$(recipe_suffix)
DEVICE   ?= auto
BACKEND  ?= engine
RESUME   ?=
NET      ?=
KEEP     ?=
# test every N iterations (default: the solver's; a run too short for it tests 4 times)
TEST_INTERVAL ?=
# DISPLAY: also X11's variable (e.g. ":0"); taken from the environment only when it is a number
DISPLAY  ?=
# bench / bench-table6 timed iterations (bench: 20 when empty; bench-table6: its own default)
ITERS    ?=

_no_digits = $(subst 9,,$(subst 8,,$(subst 7,,$(subst 6,,$(subst 5,,$(subst 4,,$(subst 3,,$(subst 2,,$(subst 1,,$(subst 0,,$(1)))))))))))
display_arg = $(if $(filter command line,$(origin DISPLAY)),--display $(call q,$(DISPLAY)),$(if $(strip $(DISPLAY)),$(if $(call _no_digits,$(strip $(DISPLAY))),,--display $(strip $(DISPLAY)))))

train_args = $(call q,$(SOLVER)) --out $(call q,$(OUT)) --device $(call q,$(DEVICE)) \
	$(if $(MAX_ITER),--max-iter $(call q,$(MAX_ITER))) $(if $(RESUME),--snapshot $(call q,$(RESUME))) \
	$(if $(NET),--net $(call q,$(NET))) $(display_arg) $(if $(TEST_INTERVAL),--test-interval $(call q,$(TEST_INTERVAL))) \
	$(if $(KEEP),--keep-snapshots $(call q,$(KEEP)))

.PHONY: answer table2 table3 table4 table5 fig7 report report-screenshot finetune-ucf101
.PHONY: help setup test caffe data-cifar10 data-cifar100 data-caltech256 data-ucf101 data-imagenet train-cifar10 train-wrn-cifar10 train-imagenet bench bench-table6 prototxt mutation mutation-sample

help:
	@echo "make setup                 create $(VENV) and install everything (CPU torch, and real pycaffe via"
	@echo "                           'make caffe'; SKIP_CAFFE=1 leaves pycaffe out, CI=true makes its failure fatal)"
	@echo "make test                  run the test suite (pycaffe tests run where 'make caffe' built it)"
	@echo "make train-cifar10         CNN-2 + Excitation Dropout on CIFAR-10 (the authors' recipe; RECIPE=paper: the paper's)"
	@echo "     DATA=<cifar-10-python.tar.gz | image folder | .tgz | list>  MAX_ITER=<n>  OUT=<run folder>"
	@echo "     VARIANT=ed|standard|standard_both|none|activation|maskimg|curriculum|adaptive|information|ed_authors"
	@echo "     RECIPE=authors|paper (default authors: their script, SGD, gaussian 0.01, raw pixels; paper: Adam, msra)"
	@echo "     DEVICE=auto|cpu|cuda  RESUME=<.solverstate>"
	@echo "     NET=<net prototxt replacing the solver's net>  DISPLAY=<n: log every n iterations>"
	@echo "     TEST_INTERVAL=<n: test every n iterations> (a MAX_ITER too short for the solver's: 20 rows, 4 tests)"
	@echo "     KEEP=<k most recent snapshots kept>  BACKEND=engine|caffe  DATA_DIR=<LMDB folder, default $(DATA_DIR)>"
	@echo "     (without DATA: the LMDBs already converted in DATA_DIR, else the official archive is downloaded)"
	@echo "make train-wrn-cifar10     WRN-28-10 (Sec. 5), VARIANT=activation|standard|none, the knobs of train-cifar10"
	@echo "make train-imagenet        AlexNet from scratch on ILSVRC-2012 (Sec. 5), VARIANT=activation|standard|none"
	@echo "                           (default activation), WEIGHTS=<.caffemodel to start from>, the knobs of"
	@echo "                           train-cifar10 but DATA (the LMDBs of make data-imagenet)"
	@echo "make data-cifar10          convert DATA into $(DATA_DIR)/{train,val}_lmdb once"
	@echo "make data-cifar100         convert CIFAR100=<cifar-100-python.tar.gz | folder | .tgz | list> (or DATA=)"
	@echo "                           into $(CIFAR100_DIR)/{train,val,test}_lmdb once (default: the official archive,"
	@echo "                           downloaded and md5-checked when missing)"
	@echo "make data-caltech256       convert CALTECH256=<256_ObjectCategories folder | .tar> into"
	@echo "                           $(CALTECH256_DIR)/{train,test,val}_lmdb once: SPLIT=0..4 of the paper's five"
	@echo "                           random splits of 50 train + 20 test images per class, 128x128"
	@echo "make data-imagenet         IMAGENET_TRAIN=<ILSVRC-2012 train folder> IMAGENET_VAL=<val folder>"
	@echo "                           IMAGENET_LABELS=<ILSVRC2012_validation_ground_truth.txt | Caffe's val.txt | ...>"
	@echo "                           (none for a val folder sorted into wnid folders): list files and 256x256 LMDBs"
	@echo "                           in data/ilsvrc12; IMAGENET_LIMIT=<n>: at most n images per class"
	@echo "make data-ucf101           UCF101=<UCF-101 folder> SPLITS=<ucfTrainTestlist> UCF_SPLIT=1..3 EVERY=<n>: frames"
	@echo "                           (every n-th, short side 256), list files and LMDBs in data/ucf101"
	@echo "make bench                 seconds per iteration, Standard vs Excitation Dropout (CNN-2, batch 100), ITERS=<n> (20)"
	@echo "make bench-table6          the paper's Table 6 runtimes (CNN-2 128x128, VGG16), NETS=cnn2,vgg16 ITERS=<n>"
	@echo "                           (defaults: ~18 minutes on 2 idle CPU cores)"
	@echo "                           BATCH=<b>; writes models/bench/table6_<net>_<cpu|cuda>.json"
	@echo "make table5                Table 5 (utilization of fc1) and Figs. 4-5 of the sweep RUNS=<sweep folder>"
	@echo "                           (default $(RUNS)), METHODS=<subset, default none,standard_fc1,curriculum,ed>"
	@echo "make fig7                  Fig. 7 (compression) and reliability diagrams of RUNS"
	@echo "make report                one HTML page + Markdown of RUNS: every table and figure (Figs. 2-7)"
	@echo "make report-screenshot     a headless chromium screenshot of that page (results/report_screenshot.png)"
	@echo "make table2                the paper's Table 2 and Fig. 3: every method, DATASETS=cifar10,cifar100,caltech256"
	@echo "                           SEEDS=<n, default 5; 1 at BUDGET=cpu, 3 at cpu-200ep> BUDGET=paper|cpu|cpu-200ep"
	@echo "                           RECIPE=paper|authors (default paper here; authors: CIFAR-10) WORKERS=<n> METHODS=<subset>"
	@echo "                           MAX_ITER=<n: every run stopped at n iterations, a reduced budget>"
	@echo "                           DATA= CIFAR100= CALTECH256= (raw sources); results/table2.md + the sweep folder"
	@echo "                           results/table2_<datasets>_<budget>/ (runs, plan.txt, JSON, fig3_<dataset>.png);"
	@echo "                           stopped and started again, finished runs are kept and snapshots resumed"
	@echo "make answer                does ED beat Standard? CIFAR-10 at the budget cpu-200ep, PHASE=A (the regime: none and"
	@echo "                           Standard, seed 1, both recipes) or B (none/Standard/ED/Activation x 3 seeds under"
	@echo "                           ANSWER_RECIPE=paper|authors, Standard/ED x 3 under the other) or C (ED's"
	@echo "                           ablations x 3 seeds under ANSWER_RECIPE); DATA= WORKERS= PRECISION=fp32 (float32, for"
	@echo "                           a CPU without native bf16: another protocol, in results/..._cpu-200ep-fp32*/)"
	@echo "make table4                the paper's Table 4: Standard first fc / both fcs and Excitation at rates"
	@echo "                           0.25 / 0.5 / 0.75, same knobs; results/table4.md"
	@echo "make table3                the paper's Table 3: No, Standard first fc / both fcs, Curriculum and Excitation"
	@echo "                           Dropout in NETS=alexnet,vgg16,vgg19 fine-tuned on UCF101 (UCF101_DIR=<the folder"
	@echo "                           of make data-ucf101, default data/ucf101>) from ALEXNET_WEIGHTS= VGG16_WEIGHTS="
	@echo "                           VGG19_WEIGHTS= (default data/weights/<the Model Zoo file>); SEEDS= WORKERS="
	@echo "                           METHODS= MAX_ITER=<n: every run stopped at n, a reduced budget>; results/table3.md"
	@echo "                           + the sweep folder results/table3_ucf101_<budget>/ (GPU work at BUDGET=paper)"
	@echo "make finetune-ucf101       one Table 3 run: NET=alexnet|vgg16|vgg19 VARIANT=ed|standard_fc6|standard_both|"
	@echo "                           none|curriculum|activation WEIGHTS=<ImageNet .caffemodel> (default: the Model Zoo"
	@echo "                           file in data/weights/) on data/ucf101; OUT= MAX_ITER= DEVICE= RESUME= KEEP= BACKEND=engine|caffe"
	@echo "make caffe                 build real pycaffe (CPU) into build/caffe"
	@echo "make prototxt              regenerate the train_val_/solver_ variants from each folder's base*.prototxt"
	@echo "make mutation              mutation testing (mutmut) of the core, layers/*.py and the modules behind the reported"
	@echo "                           numbers ([tool.mutmut] in pyproject.toml; hours on 2 cores);"
	@echo "                           score and survivors printed, work folder mutants/; MUTANTS='<glob>' for a subset"
	@echo "make mutation-sample       the same selection's score estimated from SAMPLE=<n> mutants drawn at random with"
	@echo "                           SEED=<n> (default 300, 1), with its 95% interval and the survivors named;"
	@echo "                           MUTANTS='<glob>' draws from a subset; SAMPLE_OUT=<json> (default docs/mutation-sample.json);"
	@echo "                           VERDICTS='<md> ...' (default: every docs/mutation-survivors*.md) leaves the mutants"
	@echo "                           their tables mark equivalent out of the score"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import torch, cv2, lmdb, google.protobuf, exdrop.proto; print('exdrop ready: torch', torch.__version__)"
ifneq ($(SKIP_CAFFE),1)
	@$(MAKE) --no-print-directory caffe || { \
	  if [ "$$CI" = "true" ]; then \
	    echo "setup: ERROR: pycaffe did not build; CI needs it for the differential tests (see build/caffe/logs)" >&2; exit 1; \
	  fi; \
	  echo "setup: WARNING: pycaffe did not build (see build/caffe/logs); the Caffe differential tests will skip"; }
endif

test:
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -rfEs

prototxt:
	$(PY) -m exdrop.experiments.variants
	$(PY) -m exdrop.experiments.wrn

# Mutation testing: mutmut (pinned here, installed on demand, not by setup) mutates the files of
# [tool.mutmut] in pyproject.toml in a copy under mutants/ and runs, for each mutant, only the
# tests of its selection that call the mutated function. MUTANTS='exdrop.engine.solver*' for a subset.
MUTMUT_SPEC ?= mutmut==3.8.1
MUTANTS ?=
mutation:
	$(PY) -m pip install -q "$(MUTMUT_SPEC)"
	rm -rf mutants   # a fresh run: mutmut's cache misses edited tests
	EXDROP_CAFFE_DIR=$(CURDIR)/build/caffe $(PY) -m mutmut run --max-children $$(nproc) $(if $(MUTANTS),$(call q,$(MUTANTS))) \
	  | tr '\r' '\n' | tail -n 1
	$(PY) -m mutmut results
	$(PY) -m mutmut export-cicd-stats >/dev/null && $(PY) -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	  k = s['killed'] + s['timeout'] + s['segfault']; n = s['total'] - s['skipped'] - s['no_tests']; \
	  print(f'mutation score: {k}/{n} killed ({100 * k / max(n, 1):.1f}%), {s[\"survived\"]} survived, {s[\"no_tests\"]} without tests')"

# The score estimated from a random sample (tests/mutation_sample.py): the extended selection has
# about 9,000 mutants, a night's work on 2 cores; SAMPLE=300 took about 2 hours with one busy worker.
SAMPLE ?= 300
SEED ?= 1
SAMPLE_OUT ?= docs/mutation-sample.json
VERDICTS ?= $(sort $(wildcard docs/mutation-survivors*.md))
mutation-sample:
	$(PY) -m pip install -q "$(MUTMUT_SPEC)"
	rm -rf mutants
	EXDROP_CAFFE_DIR=$(CURDIR)/build/caffe $(PY) tests/mutation_sample.py --n $(call q,$(SAMPLE)) --seed $(call q,$(SEED)) \
	  --max-children $$(nproc) $(if $(MUTANTS),--only $(call q,$(MUTANTS))) --out $(call q,$(SAMPLE_OUT)) \
	  $(foreach v,$(VERDICTS),--verdicts $(call q,$(v)))

caffe:
	PYTHON=$(PY) bash scripts/build_caffe.sh build/caffe

data-cifar10:
	$(PY) -m exdrop data cifar10 $(call q,$(DATA)) --out $(call q,$(DATA_DIR))

# data-cifar100 / data-caltech256: the source (DATA=, as given on the command line, works for CIFAR-100
# too), the output folders the prototxts read, the Caltech-256 split
CIFAR100       ?= $(if $(filter command line,$(origin DATA)),$(DATA),data/cifar-100-python.tar.gz)
CIFAR100_DIR   ?= data/cifar100
CALTECH256     ?= data/256_ObjectCategories.tar
CALTECH256_DIR ?= data/caltech256
SPLIT          ?= 0
data-cifar100:
	$(PY) -m exdrop data --dataset cifar100 $(call q,$(CIFAR100)) --out $(call q,$(CIFAR100_DIR))

data-caltech256:
	$(PY) -m exdrop data --dataset caltech256 $(call q,$(CALTECH256)) --split $(call q,$(SPLIT)) --out $(call q,$(CALTECH256_DIR))

# UCF101: UCF101=<UCF-101 video folder> SPLITS=<ucfTrainTestlist folder>, official split UCF_SPLIT=1..3
UCF101 ?= data/UCF-101
SPLITS ?= data/ucfTrainTestlist
UCF_SPLIT ?= 1
EVERY ?= 5
data-ucf101:
	$(PY) -m exdrop data --dataset ucf101 $(call q,$(UCF101)) --splits $(call q,$(SPLITS)) --split $(call q,$(UCF_SPLIT)) --every $(call q,$(EVERY)) --out data/ucf101

# ILSVRC-2012 (Sec. 5): IMAGENET_TRAIN=<train folder of wnid folders> IMAGENET_VAL=<val folder, flat or sorted
# into wnid folders> IMAGENET_LABELS=<the devkit's ground truth (meta.mat beside it) | Caffe's val.txt |
# LOC_val_solution.csv>, IMAGENET_LIMIT=<at most n images per class>; into data/ilsvrc12, the prototxts' folder
IMAGENET_TRAIN  ?= data/ILSVRC2012/train
IMAGENET_VAL    ?= data/ILSVRC2012/val
IMAGENET_LABELS ?=
IMAGENET_LIMIT  ?=
data-imagenet:
	$(PY) -m exdrop data --dataset imagenet $(call q,$(IMAGENET_TRAIN)) --val $(call q,$(IMAGENET_VAL)) \
	  $(if $(IMAGENET_LABELS),--val-labels $(call q,$(IMAGENET_LABELS))) $(if $(IMAGENET_LIMIT),--limit-per-class $(call q,$(IMAGENET_LIMIT))) \
	  --out data/ilsvrc12

# AlexNet from scratch on ILSVRC-2012 (Sec. 5): VARIANT=activation|standard|none (default activation),
# WEIGHTS=<.caffemodel to start from>, the knobs of train-cifar10 but DATA (make data-imagenet first)
WEIGHTS ?=
imagenet_variant = $(if $(filter command line environment,$(origin VARIANT)),$(VARIANT),activation)
train-imagenet: SOLVER = prototxt/alexnet/imagenet/solver_$(imagenet_variant).prototxt
train-imagenet: OUT = models/alexnet_imagenet_$(imagenet_variant)
train-imagenet:
	$(PY) -m exdrop train $(train_args) $(if $(WEIGHTS),--weights $(call q,$(WEIGHTS))) $(if $(filter caffe,$(BACKEND)),--backend caffe)

# WRN-28-10 (Sec. 5): VARIANT=activation|standard|none, the same data and knobs as train-cifar10
train-wrn-cifar10:
	$(MAKE) train-cifar10 SOLVER=prototxt/wrn/cifar10/solver_$(VARIANT).prototxt \
	  OUT=$(if $(filter command line,$(origin OUT)),$(OUT),models/wrn_cifar10_$(VARIANT))

train-cifar10:
ifeq ($(BACKEND),caffe)
	$(PY) -m exdrop train --backend caffe $(train_args) --data $(call q,$(DATA)) --data-dir $(call q,$(DATA_DIR))
else
	$(PY) -m exdrop train $(train_args) --data $(call q,$(DATA)) --data-dir $(call q,$(DATA_DIR))
endif

bench:
	$(PY) -m exdrop bench cnn2-cifar10 --iters $(or $(ITERS),20) --device $(call q,$(DEVICE)) --recipe $(given_recipe) \
	  --json models/bench/cnn2_cifar10$(given_suffix).json

# Table 6 runtimes; NETS=cnn2,vgg16  ITERS=<n> (default: 100 on CUDA, few on CPU; T6_ITERS is the
# old name)  BATCH=50  DEVICE. DEVICE=auto is resolved here, so the JSON is named _cpu or _cuda.
NETS ?= cnn2,vgg16
comma := ,
# a value as one shell word, whatever it holds (spaces, quotes, ;): every path and value a recipe passes
q = '$(subst ','"'"',$(1))'

t6_iters = $(or $(ITERS),$(T6_ITERS))
# One process per net, so each JSON's peak_rss_mb (ru_maxrss) is that net's own; the variants
# share one net's weights and Adam state (VGG16, batch 50, CPU: see README "Table 6 on CPU").
bench-table6:
	@echo "bench-table6: $(NETS) x (no dropout, Standard, ED batched, ED image by image), the JSON in models/bench/;"
	@echo "  with the default iterations about 18 minutes on 2 idle CPU cores, a minute on a GPU (ITERS=<n> shortens it)"
	@dev=$(call q,$(DEVICE)); \
	if [ "$$dev" = auto ]; then \
	  dev=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") || exit 1; \
	fi; \
	for net in $(subst $(comma), ,$(NETS)); do \
	  cmd="$(PY) -m exdrop bench table6 --nets $$net --device $$dev $(if $(t6_iters),--iters $(t6_iters)) \
	    $(if $(BATCH),--batch $(call q,$(BATCH))) --json models/bench/table6_$${net}_$${dev%%:*}.json"; \
	  echo "$$cmd"; $$cmd || exit 1; \
	done

# The paper's comparisons through the sweep runner (exdrop sweep): DATASETS=cifar10,cifar100,caltech256
# SEEDS=<n> BUDGET=paper|cpu WORKERS=<n> METHODS=<subset> SWEEP_OUT=<folder> AMP=bf16|'' (override
# the budget's). Raw sources: DATA (CIFAR-10), CIFAR100, CALTECH256, as for the data-* targets.
DATASETS ?= cifar10
SEEDS    ?= $(if $(filter cpu,$(BUDGET)),1,$(if $(filter cpu-200ep,$(BUDGET)),3,5))
BUDGET   ?= paper
WORKERS  ?= 1
METHODS  ?=
SWEEP_OUT ?=
sweep_args = --datasets $(call q,$(DATASETS)) --seeds $(call q,$(SEEDS)) --budget $(BUDGET) --recipe $(given_recipe) --workers $(call q,$(WORKERS)) --device $(call q,$(DEVICE)) \
	--data cifar10=$(call q,$(DATA)) \
	--data cifar100=$(call q,$(if $(filter command line environment,$(origin CIFAR100)),$(CIFAR100),data/cifar-100-python.tar.gz)) \
	--data caltech256=$(call q,$(CALTECH256)) \
	$(if $(METHODS),--methods $(call q,$(METHODS))) $(if $(SWEEP_OUT),--out $(call q,$(SWEEP_OUT))) $(if $(MAX_ITER),--max-iter $(call q,$(MAX_ITER))) \
	$(if $(filter command line environment,$(origin AMP)),--amp $(call q,$(AMP)))

sweep_out = $(or $(SWEEP_OUT),results/table$(1)_$(subst $(comma),_,$(DATASETS))_$(BUDGET)$(given_suffix))

# the sweep's table, JSON and figures are copied to results/ (the latest sweep's)
table2:
	$(PY) -m exdrop sweep --table 2 $(sweep_args)
	cp $(call q,$(call sweep_out,2))/table2.md $(call q,$(call sweep_out,2))/table2.json $(call q,$(call sweep_out,2))/fig3_*.png results/

table4:
	$(PY) -m exdrop sweep --table 4 $(sweep_args)
	cp $(call q,$(call sweep_out,4))/table4.md $(call q,$(call sweep_out,4))/table4.json results/

# Does Excitation Dropout beat Standard Dropout? (README "Does it reproduce?") CIFAR-10 at the cpu-200ep
# budget (200 epochs of 200 images per class, lr drop at 25%), in phases; runs already finished (their
# committed results.json) are kept, so a phase can be run again on a new machine to finish it.
#   PHASE=A  the regime: No Dropout and Standard first fc, seed 1, under both recipes
#   PHASE=B  the answer: none, Standard first fc, ED, Activation x seeds 1-3 under ANSWER_RECIPE;
#            Standard first fc and ED x seeds 1-3 under the other recipe
#   PHASE=C  if ED trails: its ablations under ANSWER_RECIPE x seeds 1-3 (no rescale, the other
#            gradient, ratio 0.25, N = the alive units: exdrop.experiments.sweep.ABLATIONS)
# Both sweeps write results/table2_cifar10_cpu-200ep[_authors]/ (ANSWER_OUT=<folder> for elsewhere).
# PRECISION=fp32: float32 instead of the budget's bf16 autocast (a CPU without native bf16, where bf16
# is ~29x slower): another protocol, so its own folders (..._cpu-200ep-fp32[_authors]/), never pooled.
PHASE ?= A
ANSWER_RECIPE ?= authors
ANSWER_OUT ?= results
PRECISION ?=
other_recipe = $(if $(filter paper,$(ANSWER_RECIPE)),authors,paper)
answer_sweep = $(PY) -m exdrop sweep --budget cpu-200ep$(if $(PRECISION), --amp '') --datasets cifar10 --data cifar10=$(call q,$(DATA)) \
	--workers $(or $(filter-out 1,$(WORKERS)),2) --threads 1 --device $(call q,$(DEVICE)) \
	--recipe $(1) --methods $(2) --seeds $(3) \
	--out $(call q,$(ANSWER_OUT))/table2_cifar10_cpu-200ep$(if $(PRECISION),-fp32)$(if $(filter authors,$(1)),_authors)
answer:
ifneq ($(filter-out fp32,$(PRECISION)),)
	$(error PRECISION=$(PRECISION): fp32, or empty for the budget's bf16 autocast)
endif
ifeq ($(PHASE),A)
	$(call answer_sweep,paper,none$(comma)standard_fc1,1)
	$(call answer_sweep,authors,none$(comma)standard_fc1,1)
else ifeq ($(PHASE),B)
	$(call answer_sweep,$(ANSWER_RECIPE),none$(comma)standard_fc1$(comma)ed$(comma)activation,1-3)
	$(call answer_sweep,$(other_recipe),standard_fc1$(comma)ed,1-3)
else ifeq ($(PHASE),C)
	$(call answer_sweep,$(ANSWER_RECIPE),ed_norescale$(comma)$(if $(filter authors,$(ANSWER_RECIPE)),ed_gradscale,ed_gradmask)$(comma)ed_ratio025$(comma)ed_alive,1-3)
else
	$(error PHASE=$(PHASE): A, B or C)
endif

# Table 3: the nets fine-tuned on UCF101 (the folder of make data-ucf101) from the Model Zoo's ImageNet
# weights, in data/weights/ where exdrop.engine.pretrained.fetch puts them. NETS is bench-table6's knob too: its
# cnn2,vgg16 default is not Table 3's, so only a NETS given on the command line (or environment) counts here.
UCF101_DIR      ?= data/ucf101
ALEXNET_WEIGHTS ?= data/weights/bvlc_alexnet.caffemodel
VGG16_WEIGHTS   ?= data/weights/VGG_ILSVRC_16_layers.caffemodel
VGG19_WEIGHTS   ?= data/weights/VGG_ILSVRC_19_layers.caffemodel
table3_nets = $(if $(filter command line environment,$(origin NETS)),$(NETS),alexnet,vgg16,vgg19)
table3_out  = $(or $(SWEEP_OUT),results/table3_ucf101_$(BUDGET)$(if $(MAX_ITER),-$(MAX_ITER)it))
table3:
	$(PY) -m exdrop sweep --table 3 --datasets ucf101 --nets $(call q,$(table3_nets)) --seeds $(call q,$(SEEDS)) --budget $(BUDGET) \
	  --workers $(call q,$(WORKERS)) --device $(call q,$(DEVICE)) --data ucf101=$(call q,$(UCF101_DIR)) \
	  --weights alexnet=$(call q,$(ALEXNET_WEIGHTS)),vgg16=$(call q,$(VGG16_WEIGHTS)),vgg19=$(call q,$(VGG19_WEIGHTS)) \
	  $(if $(METHODS),--methods $(call q,$(METHODS))) $(if $(MAX_ITER),--max-iter $(call q,$(MAX_ITER))) --out $(call q,$(table3_out)) \
	  $(if $(filter command line environment,$(origin AMP)),--amp $(call q,$(AMP)))
	cp $(call q,$(table3_out))/table3.md $(call q,$(table3_out))/table3.json results/

# One Table 3 run: NET=alexnet|vgg16|vgg19 (here the architecture, not a net prototxt), VARIANT=ed|
# standard_fc6 (or standard_fc1)|standard_both|none|curriculum|activation, WEIGHTS=<ImageNet .caffemodel>
# (default: the Model Zoo file above); the prototxts read data/ucf101
ucf_net     = $(or $(NET),alexnet)
ucf_variant = $(patsubst standard,standard_fc6,$(patsubst standard_fc1,standard_fc6,$(VARIANT)))
ucf_weights = $(or $(WEIGHTS),$(if $(filter vgg16,$(ucf_net)),$(VGG16_WEIGHTS),$(if $(filter vgg19,$(ucf_net)),$(VGG19_WEIGHTS),$(ALEXNET_WEIGHTS))))
finetune-ucf101: OUT = models/$(ucf_net)_ucf101_$(ucf_variant)
finetune-ucf101:
	$(PY) -m exdrop train prototxt/$(ucf_net)/ucf101/solver_$(ucf_variant).prototxt --weights $(call q,$(ucf_weights)) \
	  --out $(call q,$(OUT)) --device $(call q,$(DEVICE)) $(if $(MAX_ITER),--max-iter $(call q,$(MAX_ITER))) $(if $(RESUME),--snapshot $(call q,$(RESUME))) \
	  $(display_arg) $(if $(KEEP),--keep-snapshots $(call q,$(KEEP))) $(if $(filter caffe,$(BACKEND)),--backend caffe)

# the analysis of a sweep (exdrop analyze: each run's results are kept in RUN/analysis/ and reused)
RUNS ?= results/table2_cifar10_cpu-200ep_authors
analyze_args = $(call q,$(RUNS)) $(if $(METHODS),--methods $(call q,$(METHODS))) --device $(call q,$(DEVICE))

table5:
	$(PY) -m exdrop analyze $(analyze_args)
	cp $(call q,$(RUNS))/table5.md $(call q,$(RUNS))/table5.json $(call q,$(RUNS))/fig4_*.png results/

fig7:
	$(PY) -m exdrop analyze $(analyze_args) --no-over-training
	cp $(call q,$(RUNS))/fig7_*.png $(call q,$(RUNS))/reliability_*.png results/

report:
	$(PY) -m exdrop analyze $(analyze_args)
	$(PY) -m exdrop report $(call q,$(RUNS)) --out $(call q,$(RUNS))
	cp $(call q,$(RUNS))/report.md $(call q,$(RUNS))/fig*.png $(call q,$(RUNS))/reliability_*.png results/

# a headless chromium screenshot of the report: it opens, every figure shows (installs chromium once)
report-screenshot:
	scripts/screenshot.sh $(call q,$(RUNS))/report.html results/report_screenshot.png
