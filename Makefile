# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint install clean toy-teacher bench-toy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned first: the CPU wheel comes from the local folder, no CUDA download.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,browser]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# Lint: ruff (rules, import order, format), the layer contracts (import-linter) and mypy on the checked packages.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/python -m distill run recipes/toyworld.yaml
	$(BIN)/python -m distill run recipes/toyworld_lora4_dmd.yaml
	$(BIN)/python -m distill run recipes/toyworld_pruned.yaml
	$(BIN)/python -m distill run recipes/toyworld_causal_init.yaml
	$(BIN)/python -m distill run recipes/toyworld_self_forcing.yaml
	$(BIN)/python -m distill eval recipes/toyworld.yaml

# The toy world's benchmark of record for student quality: every toy student trained to convergence and graded on
# 256 prompts (~55 min on 2 CPU cores) -> outputs/toyworld_bench/eval/report.md; benchmarks/toy_bench.py says more.
bench-toy: $(STAMP)
	$(BIN)/python -m benchmarks.toy_bench

# One-off: (re)train the toy teacher shipped in teachers/toyworld/pipeline (hours on 2 CPU cores; join
# several runs with `make toy-teacher RESUME=train.resume_from_checkpoint=latest`).
toy-teacher: $(STAMP)
	test -f outputs/toyworld_teacher/init/model_index.json || $(BIN)/python -m teachers.toyworld.build outputs/toyworld_teacher/init
	$(BIN)/python -m distill train recipes/toyworld_teacher.yaml $(RESUME)
	$(BIN)/python -m distill export recipes/toyworld_teacher.yaml
	rm -rf teachers/toyworld/pipeline && cp -r outputs/toyworld_teacher/students/teacher/export/pipeline teachers/toyworld/pipeline

clean:
	rm -rf $(VENV) outputs
