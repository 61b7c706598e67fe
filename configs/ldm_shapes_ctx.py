"""The shapes-world Stable Diffusion's UNet, stage 7: stage 6's recipe (`configs/ldm_shapes_rel.py`: stage 5
fine-tuned on a relation- and count-heavy mix, on the 2-core CPU) with a context refiner added to the UNet.

    jaxdiff train --config configs/ldm_shapes_ctx.py --workdir runs/ldm_shapes_ctx
    jaxdiff export --workdir runs/ldm_shapes_ctx --out runs/ldm_shapes_ctx_export --overwrite
    jaxdiff train --config configs/ldm_shapes_ctx.py:smoke --workdir /tmp/ctx_smoke

Stage 6 left relations at chance (the named relation held as often as its opposite). The text tower is CLIP's,
causal: in "a red circle to the left of a blue square" the first object's tokens never see the relation
word, so no cross-attention key of "red" or "circle" can say "I go on the left". `model.unet_context_refiner`
puts two bidirectional self-attention layers (`UNetConfig.context_refiner`, 0.53 M params at width 128) over
the text states inside the UNet, each residual branch zero-initialised, so training starts from stage 5's
exact function and the only change from stage 6 is the refiner.

Run (session 12, 2026-12-05, 2 CPU cores): 3,000 steps in 77 min (0.70 steps/s, beside a few test runs). Result (docs/shapes_sd.md,
attempt 10): no gain on relations, so it is not the committed model. Quick check at w = 3 (first 200
validation / 100 held-out captions): 76.5 / 78.0 % (stage 5: 75.0 / 76.0 %); 200 relation prompts: 28 % right
(stage 5: 28.5 %), both objects drawn for 146 (131), the named relation holding 56 times and its opposite 60 (57 / 48).
"""

import common
import ldm_shapes_rel


def get_config(arg=None):
    c = ldm_shapes_rel.get_config()
    c.model.unet_context_refiner = 2
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)
