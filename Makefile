# The two commands of the README: `make test` and `make demo`. Each sets everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export HF_HUB_OFFLINE := 1

.PHONY: setup lint test test-all demo bench clean shapes-sd

# torch==2.13.0 is the CPU build on local disk: installed first and pinned, so nothing pulls a CUDA
# build. open-clip-torch only ships the CLIP BPE vocabulary we read; --no-deps keeps torchvision out.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'open-clip-torch>=2.24'
	touch $@

setup: $(VENV)/.installed

# ruff (pyproject.toml: rules, 100 columns) and the import contracts (dependencies point one way, no cycles).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Two workers (one per core), whole files per worker: a file's module fixtures are built once.
test: setup lint
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=20 tests

test-all: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: setup
	$(PY) -m jaxdiff.demo

# The shapes-world Stable Diffusion from scratch (configs/shapes_sd/ hold the recipe): data, CLIP, VAE, the
# UNet's stages, each exported; the exports replace the weights in models/ (model cards and sampling
# settings stay); then the guidance study into docs/shapes_sd/. Interrupted runs resume. The `gpu` stage
# is sized for one GPU (minutes there, days on 2 CPU cores); every other stage takes under two hours on
# 2 CPU cores.
JD := $(VENV)/bin/jaxdiff
UNET_STAGES := base zsnr pos long gpu words canon_first canon bind bind2 bind3
shapes-sd: setup
	$(JD) data build shapes_world --resolution 64 --train 100000 --validation 10000 --heldout 10000 --data-dir data/tfds
	$(JD) train --config configs/shapes_sd/clip.py --workdir runs/clip
	$(JD) export --workdir runs/clip --out runs/clip_export --overwrite
	cp -r runs/clip_export/. models/shapes_clip/
	$(JD) train --config configs/shapes_sd/vae.py:base --workdir runs/vae_base
	$(JD) train --config configs/shapes_sd/vae.py:ft --workdir runs/vae_ft
	$(JD) export --workdir runs/vae_ft --out runs/vae_ft_export --overwrite
	for s in $(UNET_STAGES); do \
	  $(JD) train --config configs/shapes_sd/unet.py:$$s --workdir runs/ldm_$$s && \
	  $(JD) export --workdir runs/ldm_$$s --out runs/ldm_$${s}_export --overwrite || exit 1; \
	done
	cp -r runs/ldm_bind3_export/. models/shapes_sd/
	$(PY) -m jaxdiff.eval.study --model models/shapes_sd --out docs/shapes_sd --guidance-interval 0,0.5 --weights 0,1,1.5,2,3,5,7.5

bench: setup
	$(PY) benchmarks/bench.py unet --preset sd15

clean:
	rm -rf $(VENV) out .pytest_cache
