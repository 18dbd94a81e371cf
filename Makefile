# towerrec: `make test` and `make demo` are all a fresh machine needs (Python 3.11, no GPU, offline).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPARK_STAMP := $(VENV)/.spark-installed

.PHONY: venv test demo lint bench-data clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The spark extra (prepare_data.py --engine spark): the tests check it; the demo does not need it.
$(SPARK_STAMP): $(STAMP) requirements-spark.txt
	$(PY) -m pip install -q -r requirements-spark.txt
	touch $(SPARK_STAMP)

test: $(STAMP) $(SPARK_STAMP)
	$(PY) -m pytest -q -rs tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs cache
