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

# The shapes-world Stable Diffusion from scratch: data, CLIP, VAE, UNet, each exported to models/, then the
# guidance study into docs/shapes_sd/. Interrupted runs resume. Up to UNet stage 4 about 8 hours on 2 CPU
# cores; stage 5 (configs/ldm_shapes_gpu.py) is sized for one GPU (8 min on an H200, days on 2 cores).
JD := $(VENV)/bin/jaxdiff
shapes-sd: setup
	$(JD) data build shapes_world --resolution 64 --train 100000 --validation 10000 --heldout 10000 --data-dir data/tfds
	$(JD) train --config configs/clip_shapes.py --workdir runs/clip_shapes
	$(JD) export --workdir runs/clip_shapes --out models/shapes_clip --overwrite
	$(JD) train --config configs/vae_shapes.py --workdir runs/vae_shapes
	$(JD) train --config configs/vae_shapes_ft.py --workdir runs/vae_shapes_ft
	$(JD) export --workdir runs/vae_shapes_ft --out models/shapes_vae --overwrite
	$(JD) train --config configs/ldm_shapes.py --workdir runs/ldm_shapes
	$(JD) export --workdir runs/ldm_shapes --out runs/ldm_shapes_export --overwrite
	$(JD) train --config configs/ldm_shapes_zsnr.py --workdir runs/ldm_shapes_zsnr --config.loop.steps=5500
	$(JD) export --workdir runs/ldm_shapes_zsnr --out runs/ldm_shapes_zsnr_export --overwrite
	$(JD) train --config configs/ldm_shapes_pos.py --workdir runs/ldm_shapes_pos
	$(JD) export --workdir runs/ldm_shapes_pos --out runs/ldm_shapes_pos_export --overwrite
	$(JD) train --config configs/ldm_shapes_long.py --workdir runs/ldm_shapes_long
	$(JD) export --workdir runs/ldm_shapes_long --out runs/ldm_shapes_long_export --overwrite
	$(JD) train --config configs/ldm_shapes_gpu.py --workdir runs/ldm_shapes_gpu
	$(JD) export --workdir runs/ldm_shapes_gpu --out runs/ldm_shapes_gpu_export --overwrite
	$(JD) train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words
	$(JD) train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words --config.loop.steps=1500 --config.optim.total_steps=1500
	$(JD) train --config configs/ldm_shapes_words.py --workdir runs/ldm_shapes_words --config.loop.steps=2241 --config.optim.total_steps=2500
	$(JD) export --workdir runs/ldm_shapes_words --out runs/ldm_shapes_words_export --overwrite
	$(JD) train --config configs/ldm_shapes_canon.py:first --workdir runs/ldm_shapes_canon_first
	$(JD) export --workdir runs/ldm_shapes_canon_first --out runs/ldm_shapes_canon_first_export --overwrite
	$(JD) train --config configs/ldm_shapes_canon.py --workdir runs/ldm_shapes_canon
	$(JD) export --workdir runs/ldm_shapes_canon --out runs/ldm_shapes_canon_export --overwrite
	$(JD) train --config configs/ldm_shapes_bind.py --workdir runs/ldm_shapes_bind
	$(JD) export --workdir runs/ldm_shapes_bind --out runs/ldm_shapes_bind_export --overwrite
	$(JD) train --config configs/ldm_shapes_bind.py:second --workdir runs/ldm_shapes_bind2
	$(JD) export --workdir runs/ldm_shapes_bind2 --out runs/ldm_shapes_bind2_export --overwrite
	$(JD) train --config configs/ldm_shapes_bind.py:shared --workdir runs/ldm_shapes_bind3
	$(JD) export --workdir runs/ldm_shapes_bind3 --out models/shapes_sd --overwrite
	printf '{\n  "steps": 25,\n  "guidance": 2.0,\n  "guidance_interval": [0.0, 0.5]\n}\n' > models/shapes_sd/jaxdiff_sampling.json
	$(PY) -m jaxdiff.eval.study --model models/shapes_sd --out docs/shapes_sd --guidance-interval 0,0.5 --weights 0,1,1.5,2,3,5,7.5

bench: setup
	$(PY) benchmarks/bench.py unet --preset sd15

clean:
	rm -rf $(VENV) out .pytest_cache
