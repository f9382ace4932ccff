# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[cpu,tflite,micro,distributed,qonnx,nir,reference,dev]"
	touch $(STAMP)

.PHONY: install demo test test-all bench
install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/htaf-export inspect sample_models/bnn_cnn.pt
	$(VENV)/bin/htaf-export sample_models/bnn_cnn.pt --target onnx -o out/bnn_cnn.onnx --report out/bnn_cnn.onnx.html
	$(VENV)/bin/htaf-export sample_models/bnn_cnn.pt --target tflite -o out/bnn_cnn.tflite --report out/bnn_cnn.tflite.json
	$(VENV)/bin/htaf-export sample_models/snn_zero_mlp.pt --target nir -o out/snn_zero_mlp.nir

# two worker processes (pytest-xdist), each taking whole test files, so a file's fixtures are built once
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# every cell of the user-model gallery (every model x format x target): about three times the gallery's time
test-all: $(STAMP)
	HTAF_FULL_MATRIX=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py
