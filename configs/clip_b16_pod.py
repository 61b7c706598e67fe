"""CLIP ViT-B/16 from scratch on your image-caption data, on a TPU pod (see tpu_scripts/README.md).

    jaxdiff train --config configs/clip_b16_pod.py --workdir gs://BUCKET/runs/clip_b16 --distributed \\
        --config.data.source=folder:/data/img2dataset-shards [--config.clip.loss=sigmoid]

The recipe of Radford et al. 2021 at B/16 scale: 224 px, a global batch of 32,768, AdamW (beta2 0.98,
eps 1e-6, weight decay 0.2), 10k warm-up steps then cosine decay, bf16 compute with fp32 master
params, the temperature clipped at 100. The batch splits over every chip (`data` x `fsdp`); params
and AdamW moments are FSDP-sharded over `fsdp` (B/16 is ~150M params: ~2.4 GB with both moments, so
a v5e chip would also hold them replicated; sharding leaves that memory to activations). The
contrastive loss sees the whole global batch on every chip: each chip gathers the others' embeddings
(32,768 x 512 floats, 64 MB) and computes its own [B / chips, B] logit rows (jaxdiff/train/contrastive.py);
`clip.loss=sigmoid` switches to SigLIP's loss on a ring of chips instead.
Use the OpenAI tokenizer (`model.tokenizer=clip`, 77 tokens); `model.model_dir` fine-tunes a
transformers CLIPModel folder instead of starting from scratch.
"""

import common
import ml_collections as mlc


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/clip_b16_pod.py takes no argument, got {arg!r}")
    return mlc.ConfigDict(
        dict(
            task="clip",
            model=dict(preset="b16", tokenizer="clip", model_dir=""),
            data=dict(source="folder:/data/images", resolution=224, global_batch=32768, seed=0),
            clip=dict(loss="softmax", max_logit_scale=4.6052, compute_dtype="bfloat16"),
            optim=common.optim(
                learning_rate=5e-4,
                warmup_steps=10000,
                total_steps=100000,
                final_lr_ratio=0.0,
                b2=0.98,
                eps=1e-6,
                weight_decay=0.2,
            ),
            loop=common.loop(steps=100000, log_every=50, checkpoint_every=1000, max_bad_steps=10),
            mesh=dict(shape=(1, -1, 1), rules="fsdp"),
        )
    )
