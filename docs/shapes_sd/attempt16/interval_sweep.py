"""Attempt 16: a sweep of guidance weight x guidance interval x steps on quick checks (session 19).

    python docs/shapes_sd/attempt16/interval_sweep.py MODEL KIND N_VAL N_HELDOUT W,LO,HI,STEPS ...

KIND is a scene kind or `all`; each W,LO,HI,STEPS runs `study.quick_check` at guidance W with
`guidance_interval=(LO, HI)` (0,1: every step) and writes the rows so far to interval_sweep_KIND.json.
docs/shapes_sd/attempt16/sweep.json gathers what session 19 ran (the first runs patched the guidance by hand,
with the same rule in timesteps, before the pipeline had the option).
"""

import json
import sys

from jaxdiff.eval import study
from jaxdiff.pipelines.stable_diffusion import Pipeline

pipe = Pipeline.from_pretrained(sys.argv[1])
kind = sys.argv[2] if sys.argv[2] != "all" else None
nv, nh = int(sys.argv[3]), int(sys.argv[4])
res = []
for spec in sys.argv[5:]:
    w, lo, hi, steps = spec.split(",")
    gi = None if (float(lo), float(hi)) == (0.0, 1.0) else (float(lo), float(hi))
    print(f"== w={w} interval {gi} steps {steps}", flush=True)
    rows = study.quick_check(pipe, nv, nh, float(w), kind, steps=int(steps), guidance_interval=gi)
    res.append({"w": float(w), "interval": gi, "steps": int(steps), "rows": rows})
    json.dump(res, open(f"interval_sweep_{sys.argv[2]}.json", "w"), default=float)
