# Two commands do all the set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
RUN    ?= runs/demo
# Demo settings: small and quick on synthetic data, the library defaults on real data.
ifeq ($(strip $(DATA)),)
  DEMO_DATA  := runs/synthetic-data
  TRAIN_ARGS ?= --image-size 64 --epochs 8 --patience 3
else
  DEMO_DATA  := $(DATA)
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
ifeq ($(strip $(DATA)),)
	$(BIN)/skinfusion synth --out $(DEMO_DATA)
endif
	$(BIN)/skinfusion train --view rgb --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS)
	$(BIN)/skinfusion train --view hsv --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS)
	$(BIN)/skinfusion train --view fft --data $(DEMO_DATA) --run $(RUN) $(TRAIN_ARGS)
	$(BIN)/skinfusion fuse --run $(RUN) --method mean
	$(BIN)/skinfusion evaluate --run $(RUN)
	$(BIN)/skinfusion predict --run $(RUN) $$(ls -d $(DEMO_DATA)/images/* | head -n 1)

test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs *.egg-info
