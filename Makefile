# diffcli developer tasks. `make test` and `make demo` install what they need on first use.
#
# Torch, in one place: `make install` reuses a torch that is already importable (the venv is made
# with --system-site-packages, so a system-wide torch counts). Otherwise, on a machine with no
# NVIDIA GPU it installs $(TORCH_CPU) (on this project's machines torch==2.13.0 is a CPU wheel on
# local disk; elsewhere pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to get a CPU build),
# and with an NVIDIA GPU it lets pip pick the default (CUDA) build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.diffcli-installed

.PHONY: install test fuzz lint demo latent-demo text-demo bench cpu-curve weights weights-latent weights-text text-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch: reusing $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "torch: NVIDIA GPU found, installing the default (CUDA) build"; \
		$(PY) -m pip install -q torch; \
	else \
		echo "torch: no NVIDIA GPU, installing $(TORCH_CPU) (CPU)"; \
		$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[dev,clip]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The fuzz suite at length: FUZZ random mutants per reader on top of the systematic ones (`make test`
# draws 60 to 150), seeded by FUZZ_SEED; prints how many mutants each reader tried. A few minutes.
FUZZ ?= 5000
FUZZ_SEED ?= 0
fuzz: install
	DIFFCLI_FUZZ=$(FUZZ) DIFFCLI_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest -q -s tests/test_fuzz.py

lint: install
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check diffcli tests benchmarks

demo: install
	$(VENV)/bin/diffcli sample --steps 50

# Colour photos from the shipped latent CIFAR-10 model: four of each class, a grid per class row
latent-demo: install
	$(VENV)/bin/diffcli sample -c weights/diffcli-cifar10-latent.safetensors -n 40 --seed 0 --out samples-cifar10 \
		--grid samples-cifar10-grid.png

# Pictures from the shipped text-to-image model: a prompt it saw in training and one it never saw
text-demo: install
	$(VENV)/bin/diffcli sample -c weights/diffcli-shapes.safetensors --prompts weights/shapes-prompts.txt -n 4 \
		--seed 0 --out samples-shapes --name '{prompt_index}-{prompt}-{seed}.png' --grid samples-shapes-grid.png

# Speed against diffusers and the machine's matmul peak: a table, and benchmarks/results.json.
# About 10-15 minutes on 2 CPU cores; BENCH_FLAGS=--quick for a smoke run. The `bench` extra
# (diffusers) goes into the venv next to the torch already there, which pip keeps.
# Then the targets of `diffcli eval` (benchmarks/eval_bench.py, benchmarks/eval_results.json; about
# 10 minutes; needs the MNIST folder DATA, else only its correctness part runs), and those of `diffcli
# tune` (benchmarks/tune_bench.py, benchmarks/tune_results.json; about 20 minutes; its guidance
# interval part needs DATA too), then the latent targets: autoencoder parity with diffusers
# (benchmarks/ae_parity.py, about 1 minute) and latent against pixel speed at 64x64
# (benchmarks/latent_speed.py, about 5 minutes). torch-fidelity goes in
# with --no-deps: its torchvision requirement would replace the CPU torch (pip resolves torch 2.14.1
# with CUDA and torchvision 0.29.1), and diffcli and this comparison use none of torchvision.
BENCH_FLAGS ?=
BENCH_STAMP := $(VENV)/.diffcli-bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps 'torch-fidelity>=0.3' tqdm
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run.py $(BENCH_FLAGS)
	$(PY) benchmarks/eval_bench.py $(if $(wildcard $(DATA)),--data $(DATA),--parts correctness)
	$(PY) benchmarks/tune_bench.py $(if $(wildcard $(DATA)),--data $(DATA),--parts quality,e2e,tune)
	$(PY) benchmarks/ae_parity.py
	$(PY) benchmarks/latent_speed.py

# The shipped model: the exact recipe of weights/README.md. The run folder lives outside the
# repository and `--resume auto` continues an interrupted run. About 9 hours on a 2-core CPU
# (88 images/s); add TRAIN_FLAGS="--device cuda" on a GPU. DATA is the MNIST test split as an image
# folder: `python -m diffcli.data.mnist IDX_DIR DIR` makes one from the MNIST files. It is checked first,
# so a missing folder fails before anything is installed or created.
DATA ?= ../shared/data/mnist-10k
WEIGHTS_RUN ?= ../diffcli-runs/mnist
TRAIN_FLAGS ?=
weights:
	@test -d "$(DATA)" || { echo 'Error: no MNIST folder at $(DATA); make one with python -m diffcli.data.mnist and pass DATA=path (see weights/README.md)' >&2; exit 4; }
	@$(MAKE) --no-print-directory install
	$(VENV)/bin/diffcli train $(DATA) --out $(WEIGHTS_RUN) --resume auto \
		--model DiT-M/4 --long-skip --resolution 28 --channels auto --batch-size 256 \
		--lr 1e-3 --warmup-steps 500 --ema-decay 0.9995 --schedule cosine --prediction v \
		--min-snr-gamma 5 --class-dropout 0.1 --guidance 1.5 --seed 0 --steps 11262 \
		--checkpoint-every 1000 --keep-last 2 --sample-every 1000 --save-dtype fp16 $(TRAIN_FLAGS)
	cp $(WEIGHTS_RUN)/model.safetensors weights/diffcli-mnist.safetensors

# The colour models (README: Latent models): the f=4 autoencoder shipped in weights/ (55 minutes of
# training on 2 CPU cores), then the latent DiT with its learning curve (benchmarks/latent_curve.json),
# both on 18,000 of the 20,000 CIFAR-10 photos; the other 2,000 are held out to measure them
# (benchmarks/split_folder.py). The latent stage has not been run to the end yet (issue 12 is open).
# Run folders go to LATENT_RUNS, outside the repository; an interrupted call continues where it stopped.
CIFAR ?= ../shared/data/cifar10-20k
LATENT_RUNS ?= ../diffcli-runs
AE_STEPS ?= 4741
weights-latent:
	@test -d "$(CIFAR)" || { echo 'Error: no CIFAR-10 class folder at $(CIFAR); pass CIFAR=path' >&2; exit 4; }
	@$(MAKE) --no-print-directory install
	$(PY) benchmarks/split_folder.py $(CIFAR) $(LATENT_RUNS)/cifar --held-out 200
	$(VENV)/bin/diffcli train-autoencoder $(LATENT_RUNS)/cifar/train --out $(LATENT_RUNS)/ae-f4 --resume auto \
		--preset f4 --resolution 32 --batch-size 32 --lr 5e-4 --flip --holdout 256 --steps $(AE_STEPS) \
		--checkpoint-every 1000 --sample-every 2000
	cp $(LATENT_RUNS)/ae-f4/model.safetensors weights/cifar10-ae-f4.safetensors
	$(PY) benchmarks/cpu_curve.py --data $(LATENT_RUNS)/cifar/train --run $(LATENT_RUNS)/latent-cifar \
		--results benchmarks/latent_curve.json --resolution 32 --minutes 10,20,30 --samplers default \
		-- --autoencoder weights/cifar10-ae-f4.safetensors --model DiT-M/2 --flip --guidance 3 --save-dtype fp16
	cp $(LATENT_RUNS)/latent-cifar/model.safetensors weights/diffcli-cifar10-latent.safetensors
	$(PY) benchmarks/cpu_curve.py --plot benchmarks/latent_curve.png benchmarks/latent_curve.json

# The shipped text-to-image model (README "Text-to-image"): the synthetic shapes set of
# benchmarks/shapes.py (40 images of each of the 136 seen triples; the 32 held-back ones never drawn),
# then `train --preset quick` on 2 CPU threads for 12,431 steps (the shipped run stopped there; about
# 2.7 hours on an idle machine; --time-limit is a ceiling, counted across resumes). Run folders go to TEXT_RUNS, outside
# the repository; an interrupted call continues where it stopped. text-bench scores the model with
# the pixel judge (benchmarks/text_bench.py, seen and held-back triples) and measures the text model's
# training throughput against the class model's (benchmarks/text_speed.py).
TEXT_RUNS ?= ../diffcli-runs
weights-text: install
	test -d $(TEXT_RUNS)/shapes || $(PY) benchmarks/shapes.py $(TEXT_RUNS)/shapes --per-triple 40 --seed 0
	$(VENV)/bin/diffcli train $(TEXT_RUNS)/shapes --out $(TEXT_RUNS)/text-shapes --resume auto --preset quick \
		--guidance 3 --steps 12431 --time-limit 400 --save-dtype fp16 --threads 2
	cp $(TEXT_RUNS)/text-shapes/model.safetensors weights/diffcli-shapes.safetensors

text-bench: install
	$(PY) benchmarks/text_bench.py --model weights/diffcli-shapes.safetensors --per-triple 5 --out benchmarks/text_results.json
	$(PY) benchmarks/text_speed.py --out benchmarks/text_speed.json

# The learning curves of README "Training on a CPU": the quick and the default recipe on 2 CPU threads,
# scored at fixed minutes of training (benchmarks/cpu_curve.py; about 1.5 hours, on an idle machine:
# the minutes are wall-clock). Run folders go to CURVE_RUNS, outside the repository; an interrupted
# call continues where it stopped.
CURVE_RUNS ?= ../diffcli-runs
cpu-curve:
	@test -d "$(DATA)" || { echo 'Error: no MNIST folder at $(DATA); make one with python -m diffcli.data.mnist and pass DATA=path (see weights/README.md)' >&2; exit 4; }
	@$(MAKE) --no-print-directory install
	$(PY) benchmarks/cpu_curve.py --data $(DATA) --recipe quick --run $(CURVE_RUNS)/curve-quick \
		--results benchmarks/cpu_curve_quick.json --minutes 5,10,20,30,45
	$(PY) benchmarks/cpu_curve.py --data $(DATA) --recipe default --run $(CURVE_RUNS)/curve-default \
		--results benchmarks/cpu_curve_default.json --minutes 10,30
	$(PY) benchmarks/cpu_curve.py --plot benchmarks/cpu_curve.png benchmarks/cpu_curve_default.json \
		benchmarks/cpu_curve_quick.json

clean:
	rm -rf $(VENV) .pytest_cache
