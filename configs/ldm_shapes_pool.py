"""The shapes-world Stable Diffusion's UNet with the caption pooled into its time embedding (attempt 11):
stage 6's recipe (`configs/ldm_shapes_rel.py`: stage 5 fine-tuned on a relation- and count-heavy mix) with
DeepFloyd IF's text pooling added (`model.unet_text_pooling=H`: `addition_embed_type="text"`, the text
states attention-pooled with H heads, projected and added to the time embedding, as GLIDE and Imagen add a
pooled text vector). The new branch's last LayerNorm starts at zero, so training starts from stage 5's exact
function.

    jaxdiff train --config configs/ldm_shapes_pool.py --workdir runs/ldm_shapes_pool
    jaxdiff train --config configs/ldm_shapes_pool.py:smoke --workdir /tmp/pool_smoke

Why: at t = T the committed UNet's conditional mean is blind to the relation word (docs/shapes_sd.md,
attempt 11), though it follows position phrases; cross-attention reads per-token keys, and a relation is a
fact about the whole caption. A pooled vector scales and shifts every ResNet's features (FiLM through the
time embedding), a global path cross-attention lacks.

Not run in full. A 300-step probe at t in [980, 1000) with the branch at diffusers' init (docs/shapes_sd.md,
attempt 11) moved nothing: the relation's obstacle is the variance of the single-render target there, not
the path (the same steps with each caption's mean latent as the target do learn it).
"""

import common
import ldm_shapes_rel


def get_config(arg=None):
    c = ldm_shapes_rel.get_config()
    c.model.unet_text_pooling = 4
    if arg == "smoke":
        c.model.model_dir = ""
        c.model.scaling_factor = 0.18215
    return common.apply_arg(c, arg, __file__)
