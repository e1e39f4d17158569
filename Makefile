# Two commands do all the set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
# Demo settings: small and quick on synthetic data, the library defaults on real data.
# Each dataset gets its own run directory, since a run's split belongs to one dataset.
ifeq ($(strip $(DATA)),)
  DEMO_DATA  := runs/synthetic-data
  RUN        ?= runs/demo-synthetic
  TRAIN_ARGS ?= --image-size 64 --epochs 8 --patience 3
else
  DEMO_DATA  := $(DATA)
  RUN        ?= runs/demo-$(notdir $(abspath $(DATA)))
  TRAIN_ARGS ?=
endif

.PHONY: demo test install clean

$(BIN)/skinfusion: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/skinfusion

demo: install
	@# exit status 1 from train or evaluate only means unreadable images were skipped (listed in skipped.csv)
ifeq ($(strip $(DATA)),)
	$(BIN)/skinfusion synth --out $(DEMO_DATA)
endif
	$(BIN)/skinfusion train --view rgb --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS) || [ $$? -eq 1 ]
	$(BIN)/skinfusion train --view hsv --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS) || [ $$? -eq 1 ]
	$(BIN)/skinfusion train --view fft --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS) || [ $$? -eq 1 ]
	$(BIN)/skinfusion train --view rgb_sog --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS) || [ $$? -eq 1 ]
	$(BIN)/skinfusion train --view hsv_sog --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS) || [ $$? -eq 1 ]
	$(BIN)/skinfusion fuse --run $(RUN) --method mean
	$(BIN)/skinfusion evaluate --run $(RUN) || [ $$? -eq 1 ]
	@# predict one held-out test image through the Python-facing bundle
	$(BIN)/skinfusion predict --run $(RUN) \
	  "$(DEMO_DATA)/images/$$(awk -F, '$$5 == "test" {print $$1; exit}' $(RUN)/splits.csv).jpg"

# Two pytest processes (pytest-xdist) share the suite a whole file at a time, so that a file's
# trained fixtures are trained once; PYTEST_WORKERS=0 runs it in this one process.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -ra -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing, since CI must test something"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs *.egg-info
