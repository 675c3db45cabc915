# Two commands from a fresh clone: `make run` (the main job) and `make test`.
# Every target first makes sure .venv exists and is at least as new as pyproject.toml (stamp file).

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WARMED  := $(VENV)/.bytecode
PROFILE ?= quick
JOBS    ?= 2
OVERRIDES ?=
CHECKPOINT ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: setup run test lint format reports app lab bench data clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

# Bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI machines here) no process writes .pyc files, and
# every kernel and subprocess compiled torch again (the suite ran 30% slower). Byte-compiling all 2.3 GB
# of the venv up front (compileall) costs ~1 min; instead the recipes below run with the variable unset,
# so the first process to import a module writes its .pyc and every later one reads it (~15 s for what
# the suite imports). Commands typed outside make (`.venv/bin/workbench train ...`) keep the
# variable, so every target that leads to them also writes, once, the .pyc of what the commands import
# ($(WARMED): WARM_TORCH and WARM_UI in two processes at once, ~30 s): without them every such process
# compiled ~3,000 modules again (a 1-update stage 3 with its evaluation: 47 s against 27 s). `make test`
# and the lint targets skip it: their recipes write what they import.
unexport PYTHONDONTWRITEBYTECODE
WARM_TORCH := torch._dynamo torchmetrics workbench.cli workbench.train.loop workbench.evaluate workbench.adapt \
	workbench.bench workbench.inference workbench.notebook matplotlib.pyplot
WARM_UI := gradio papermill nbconvert plotly.graph_objects ipykernel.kernelapp workbench.report.pipeline
IMPORT := $(PY) -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"

# The install: pip fetches uv into the venv and uv installs the project (60 s of pip's single-threaded
# resolving and unpacking became ~20 s). uv reads no pip configuration, so tools/uv_args.py hands it pip's
# package sources (here the find-links of a local CPU torch wheel, which uv, like pip, prefers to the
# CUDA build of 2.13.0). Should uv fail, or not be available, pip installs as before.
# Where one version of a package lies on two indexes, uv takes the first index's file and pip the best
# wheel of both: here the first index holds soundfile's pure-Python wheel, which carries no libsndfile
# ("sndfile library not found"), the second its manylinux wheel, which does. So the install ends by
# loading soundfile; should that fail, pip puts the same version in again from the wheel it prefers.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check 'uv>=0.9,<1' \
		&& $(VENV)/bin/uv pip install --quiet --python $(PY) $$($(PY) tools/uv_args.py) -e '.[dev]' \
		|| $(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	@$(PY) -c "import soundfile" 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check \
		--force-reinstall --no-deps "soundfile==$$($(PY) -c "import importlib.metadata as m; print(m.version('soundfile'))")"
	$(PY) -c "import soundfile"
	@touch $(STAMP)

$(WARMED): $(STAMP)
	$(IMPORT) $(WARM_UI) & ui=$$!; $(IMPORT) $(WARM_TORCH) && wait $$ui
	@touch $(WARMED)

setup: $(WARMED)  ## create .venv and install the project (skipped when up to date)

run: $(WARMED)  ## build the data, run the quick notebook pipeline, then serve the app on :7860
	$(VENV)/bin/workbench data build
	$(VENV)/bin/workbench pipeline --profile quick --jobs $(JOBS)
	@echo "report: reports/latest/index.html"
	$(VENV)/bin/workbench app --checkpoint reports/latest/artifacts/03_stage3_multitask/run/checkpoint

test: $(STAMP)  ## lint + every test (unit, integration, notebooks, app API, browser if chromium)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint and format check only
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: $(WARMED)  ## build the embedded dataset cache
	$(VENV)/bin/workbench data build

reports: $(WARMED)  ## the notebook pipeline only (PROFILE=quick|full, JOBS=n at once, OVERRIDES="k=v ...", KEEP_GOING=1)
	$(VENV)/bin/workbench pipeline --profile $(PROFILE) --jobs $(JOBS) $(if $(KEEP_GOING),--keep-going) $(OVERRIDES)

app: $(WARMED)  ## the Gradio app only (CHECKPOINT=dir, default the newest in runs/)
	$(VENV)/bin/workbench app $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

lab: $(WARMED)  ## JupyterLab with the project's kernel registered
	$(PY) -m ipykernel install --user --name workbench --display-name "Python (workbench)"
	$(abspath $(VENV))/bin/jupyter lab --notebook-dir=notebooks

bench: $(WARMED)  ## the benchmark suite -> benchmarks/results/*.json and a markdown table
	$(VENV)/bin/workbench bench

clean:  ## remove runs/, reports/ and caches (keeps .venv)
	rm -rf runs reports .pytest_cache .ruff_cache
