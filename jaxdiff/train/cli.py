"""`jaxdiff train --config configs/NAME.py[:arg] --workdir DIR [--config.key=value ...]`.

The config file's ``get_config(arg)`` returns an ml_collections ConfigDict; it is locked, overrides
are applied (an unknown key is an error naming the known ones), and from there only typed
dataclasses flow: the task, OptimConfig, LoopConfig, the mesh and the input pipeline.
Multi-host: ``--coordinator-address HOST:PORT --num-processes N --process-id I`` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) start jax.distributed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
from etils import epath
from flax import linen as nn

from jaxdiff import sharding as sh
from jaxdiff.convert.clip import load_clip as load_clip_folder
from jaxdiff.convert.diffusers import COMPONENTS, UNET_EXTENSIONS
from jaxdiff.convert.pretrained import load_pretrained
from jaxdiff.convert.runs import load_clip, load_vae
from jaxdiff.data import pipeline as pl
from jaxdiff.data.shapes_world import vocabulary
from jaxdiff.models import clip as clip_lib
from jaxdiff.models import text, unet, vae
from jaxdiff.models.unet import grow_params
from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer, write_small_clip_tokenizer
from jaxdiff.train import clip as clip_task_lib
from jaxdiff.train import ldm as ldm_task_lib
from jaxdiff.train import loop
from jaxdiff.train import vae as vae_task_lib
from jaxdiff.train.export import RANDOM_TEXT, latent_scaling_factor, write_ldm_record
from jaxdiff.train.metrics import MetricWriter, json_safe, write_run_info
from jaxdiff.train.optim import OptimConfig

# keys that may change between a run and its resumption (the rest must match the checkpoints);
# optim.total_steps with loop.steps extends a run: the learning-rate schedule is a function of the step,
# so the resumed run follows the longer schedule from the step it resumes at
RESUMABLE_KEYS = (
    "loop.steps",
    "loop.log_every",
    "loop.checkpoint_every",
    "loop.keep_checkpoints",
    "loop.async_checkpoints",
    "loop.sample_every",
    "optim.total_steps",
)


def config_file(name: str) -> Path:
    """A config file's path: ``name`` itself, else one of jaxdiff's configs (``configs/`` of a clone,
    ``jaxdiff.configs`` of an installed wheel), named with or without the ``configs/`` prefix."""
    if Path(name).is_file():
        return Path(name)
    spec = importlib.util.find_spec("jaxdiff.configs")
    roots = [Path(r) for r in (spec.submodule_search_locations or [])] if spec else []
    roots.append(Path(__file__).resolve().parents[2] / "configs")  # a clone (editable install)
    rel = name.removeprefix("configs/")
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    known = sorted({p.name for r in roots for p in r.glob("*.py") if p.name != "common.py"})
    raise SystemExit(
        f"jaxdiff train: config file {name} not found, neither a path nor one of jaxdiff's configs "
        f"({', '.join(known)})"
    )


def shapes_options(data) -> dict:
    """`data.shapes` of a config (kinds, canonical, shared), as `pl.open_source` takes them."""
    shapes = data.get("shapes")
    return {} if shapes is None else {k: v for k, v in shapes.to_dict().items() if v}


def load_config(spec: str):
    """``path.py[:arg]`` -> the locked ConfigDict of its get_config(arg)."""
    name, _, arg = spec.partition(":")
    path = config_file(name)
    mod_spec = importlib.util.spec_from_file_location(f"jaxdiff_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    # configs import their shared `common` from their folder or the one above (configs/shapes_sd/*.py)
    folders = [str(Path(path).resolve().parent), str(Path(path).resolve().parent.parent)]
    sys.path[:0] = folders
    try:
        mod_spec.loader.exec_module(module)
    finally:
        del sys.path[: len(folders)]
    if not hasattr(module, "get_config"):
        raise SystemExit(f"jaxdiff train: {path} has no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:  # an unknown :ARG, named by the config with the ones it knows
        raise SystemExit(f"jaxdiff train: {e}") from None
    config.lock()
    return config


def apply_overrides(config, overrides: list[str]):
    """``key.sub=value`` strings (values as Python literals, else strings) onto a locked config."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"jaxdiff train: --config.{item}: expected --config.KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            known = sorted(node.keys()) if hasattr(node, "keys") else []
            if part not in known:
                where = ".".join(parts[:i]) or "the config"
                raise SystemExit(
                    f"jaxdiff train: unknown config key {key!r} ({where} has {', '.join(known)})"
                )
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise SystemExit(f"jaxdiff train: --config.{key}={raw}: {e}") from None
    return config


def _dataclass(cls, values):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SystemExit(
            f"jaxdiff train: unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _distributed(args):

    addr = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if args.distributed and not addr:
        jax.distributed.initialize(
            initialization_timeout=args.init_timeout
        )  # auto-detected cluster
    elif addr:
        n = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
        i = (
            args.process_id
            if args.process_id is not None
            else int(os.environ.get("JAX_PROCESS_ID", "-1"))
        )
        if n < 1 or i < 0:
            raise SystemExit(
                "jaxdiff train: a coordinator address needs --num-processes and --process-id"
            )
        jax.config.update(
            "jax_cpu_collectives_implementation", "gloo"
        )  # CPU processes talk over gloo
        jax.distributed.initialize(
            addr, num_processes=n, process_id=i, initialization_timeout=args.init_timeout
        )


def build(config, mesh=None, rules=None, workdir=None):
    """The task, tokenizer and frozen parts a config describes."""

    if config.task == "clip":
        return _build_clip(config, mesh, rules, workdir)

    m = config.model
    sd = None

    def clip_vocabulary():  # the CLIP vocabulary's folder, built locally by every process
        return write_clip_tokenizer(
            Path(tempfile.mkdtemp(prefix="jaxdiff-tokenizer-")) / "tokenizer"
        )

    if config.task == "vae" and m.model_dir:
        # fine-tune a VAE: from a VAE run, an exported AutoencoderKL folder or a diffusers folder's vae/

        try:
            vcfg, init = load_vae(m.model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"jaxdiff train: model.model_dir: {e}") from None
        return vae_task_lib.vae_task(
            _dataclass(vae_task_lib.VAEConfigTrain, dict(config.vae)), vcfg, init_params=init
        ), Tokenizer(clip_vocabulary())
    if m.model_dir:
        sd = load_pretrained(m.model_dir)
        tok, tok_folder = sd.tokenizer, Path(m.model_dir) / "tokenizer"
    else:
        tok_folder = clip_vocabulary()
        tok = Tokenizer(tok_folder)

    def preset(kind, name):

        table = {"unet": unet, "vae": vae, "text_encoder": text}[kind].PRESETS
        if name not in table:
            hint = " (set model.text_encoder to a CLIP)" if kind == "text_encoder" else ""
            raise SystemExit(
                f"jaxdiff train: model.preset {name!r} has no {kind} preset{hint}; "
                f"{kind} presets: {sorted(table)}"
            )
        cfg = table[name]
        if kind == "text_encoder":
            cfg = dataclasses.replace(cfg, vocab_size=49408)  # the real CLIP vocabulary
        return cfg

    def random_params(kind, cfg, seed):
        module = COMPONENTS[kind].module(
            cfg
        )  # one jitted init: eagerly, each op compiles on its own
        init = jax.jit(lambda key, *x: nn.unbox(module.init(key, *x)["params"]))
        return init(jax.random.key(seed), *COMPONENTS[kind].dummy_inputs(cfg))

    if config.task == "vae":
        vcfg = sd.vae_config if sd else preset("vae", m.preset)
        return vae_task_lib.vae_task(
            _dataclass(vae_task_lib.VAEConfigTrain, dict(config.vae)),
            vcfg,
            init_params=sd.params["vae"] if sd else None,
        ), tok
    if config.task != "ldm":
        raise SystemExit(f"jaxdiff train: unknown task {config.task!r} (known: clip, ldm, vae)")
    if sd:
        ucfg, vcfg, tcfg = sd.unet_config, sd.vae_config, sd.text_config
        frozen = {"vae": sd.params["vae"], "text_encoder": sd.params["text_encoder"]}
        init = sd.params["unet"]
        for field, _, what, unit in UNET_EXTENSIONS:  # add (or resize) jaxdiff's UNet extensions
            value = m.get(f"unet_{field}", None)
            if value is not None and value != getattr(ucfg, field):
                new_cfg = _with_unet(ucfg, field, value)
                init, copied, fresh = grow_params(init, random_params("unet", new_cfg, 4))
                ucfg = new_cfg
                print(f"UNet: {what} of {value} {unit} ({fresh} new tensors)", flush=True)
    else:
        ucfg, vcfg = preset("unet", m.preset), preset("vae", m.preset)
        for field, *_ in UNET_EXTENSIONS:
            if m.get(f"unet_{field}", None) is not None:
                ucfg = _with_unet(ucfg, field, m[f"unet_{field}"])
        frozen = {"vae": random_params("vae", vcfg, 1)}
        if not m.get("text_encoder"):
            tcfg = preset("text_encoder", m.preset)
            frozen["text_encoder"] = random_params("text_encoder", tcfg, 2)
        init = None
    if m.get("text_encoder") == RANDOM_TEXT:  # a fresh tower trained with the UNet (GLIDE)
        if not config.ldm.get("train_text_encoder"):
            raise SystemExit(
                "jaxdiff train: model.text_encoder='random' needs ldm.train_text_encoder=True "
                "(a frozen random text encoder says nothing about the prompt)"
            )
        if sd is None:
            tcfg = preset("text_encoder", m.preset)
        frozen["text_encoder"] = random_params("text_encoder", tcfg, 3)
        print(
            f"text encoder: a new random tower ({tcfg.num_hidden_layers} layers, width {tcfg.hidden_size}), "
            "trained with the UNet",
            flush=True,
        )
    elif m.get("text_encoder"):  # a CLIP's text tower, frozen, as SD uses OpenAI's CLIP
        ccfg, cparams, tok_folder = load_clip(m.text_encoder)
        tcfg, frozen["text_encoder"] = clip_lib.text_encoder(ccfg, cparams)
        tok = Tokenizer(tok_folder, max_length=ccfg.text.max_position_embeddings)
        how = "trained with the UNet from" if config.ldm.get("train_text_encoder") else "frozen:"
        print(f"text encoder: {how} the text tower of {m.text_encoder}", flush=True)
    if tcfg.hidden_size != ucfg.cross_attention_dim:
        raise SystemExit(
            f"jaxdiff train: the text encoder's width {tcfg.hidden_size} differs from the UNet's "
            f"cross_attention_dim {ucfg.cross_attention_dim} (model.preset={m.preset!r})"
        )
    if m.get(
        "vae_workdir"
    ):  # a `jaxdiff train` VAE run (configs/vae_*.py) or an exported vae/ folder
        try:
            vae_cfg, vae_params = load_vae(m.vae_workdir)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"jaxdiff train: model.vae_workdir: {e}") from None
        shapes = jax.tree.map(lambda x: x.shape, frozen["vae"])
        if jax.tree.map(lambda x: x.shape, vae_params) != shapes:
            raise SystemExit(
                f"jaxdiff train: the VAE in {m.vae_workdir} does not match model.preset={m.preset!r}"
            )
        frozen["vae"] = vae_params
        vcfg = dataclasses.replace(vcfg, scaling_factor=vae_cfg.scaling_factor)
        print(f"frozen VAE: {m.vae_workdir}", flush=True)
    if m.get("scaling_factor", None) is not None and not sd:
        factor = m.scaling_factor
        if factor == 0:  # 1 / std of the training latents, as SD 1's 0.18215 was chosen
            factor = latent_scaling_factor(
                vcfg,
                frozen["vae"],
                config.data.source,
                config.data.resolution,
                shapes=shapes_options(config.data),
            )
            print(
                f"latent scaling factor: {factor:.5f} (1 / std of 1,024 training latents)",
                flush=True,
            )
        vcfg = dataclasses.replace(vcfg, scaling_factor=float(factor))
    ldm = _dataclass(ldm_task_lib.LDMConfig, dict(config.ldm))
    if workdir is not None and jax.process_index() == 0:
        write_ldm_record(
            workdir,
            ucfg,
            vcfg,
            tcfg,
            ldm,
            tok_folder,
            text_encoder=m.get("text_encoder", ""),
            vae_workdir=m.get("vae_workdir", ""),
            model_dir=m.get("model_dir", ""),
        )
    prompts = list(config.get("sample_prompts", ())) or None
    return ldm_task_lib.ldm_task(
        ldm,
        ucfg,
        vcfg,
        tcfg,
        frozen,
        tok("")[0],
        init_params=init,
        sample_ids=tok(prompts) if prompts else None,
        sample_resolution=config.data.resolution,
    ), tok


def _with_unet(ucfg, field, value):
    """``ucfg`` with jaxdiff's UNet extension ``field`` set from ``model.unet_<field>``."""
    try:
        return dataclasses.replace(ucfg, **{field: int(value)})
    except ValueError as e:
        raise SystemExit(f"jaxdiff train: model.unet_{field}={value!r}: {e}") from None


def clip_tokenizer(kind: str, folder, max_length: int):
    """The tokenizer a CLIP config names, written to ``folder``: ``shapes`` (the shapes world's
    644-token vocabulary), ``clip`` (OpenAI's 49,408 tokens), or a tokenizer folder's path."""

    if kind == "shapes":
        return Tokenizer(
            write_small_clip_tokenizer(folder, vocabulary(), max_length=max_length), max_length
        )
    if kind == "clip":
        return Tokenizer(write_clip_tokenizer(folder, max_length=max_length), max_length)
    if not Path(kind).is_dir():
        raise SystemExit(
            f"jaxdiff train: model.tokenizer {kind!r}: expected shapes, clip or a tokenizer folder"
        )

    shutil.copytree(kind, folder, dirs_exist_ok=True)
    return Tokenizer(folder, max_length)


def _build_clip(config, mesh, rules, workdir):
    """CLIP: a preset (or a transformers CLIPModel folder to fine-tune) and its tokenizer, which is
    also saved as WORKDIR/tokenizer so the run's checkpoints are usable on their own."""

    m, init = config.model, None
    if m.get("model_dir"):
        ccfg, init = load_clip_folder(m.model_dir)
    elif m.preset in clip_lib.PRESETS:
        ccfg = clip_lib.PRESETS[m.preset]
    else:
        raise SystemExit(
            f"jaxdiff train: model.preset {m.preset!r}: choose one of {sorted(clip_lib.PRESETS)}"
        )
    train_cfg = _dataclass(clip_task_lib.CLIPConfigTrain, dict(config.clip))
    if train_cfg.loss == "sigmoid" and ccfg.logit_bias_init is None:  # SigLIP's initialisation
        ccfg = dataclasses.replace(ccfg, logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
    if config.data.resolution != ccfg.vision.image_size:
        raise SystemExit(
            f"jaxdiff train: data.resolution {config.data.resolution} differs from the vision tower's "
            f"image_size {ccfg.vision.image_size}"
        )
    n = ccfg.text.max_position_embeddings
    here = Path(tempfile.mkdtemp(prefix="jaxdiff-tokenizer-")) / "tokenizer"
    tok = clip_tokenizer(m.tokenizer, here, n)
    if (
        init is None and len(tok._tok) <= ccfg.text.vocab_size
    ):  # from scratch: the tokenizer's own ids
        ccfg = dataclasses.replace(
            ccfg,
            text=dataclasses.replace(
                ccfg.text, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id
            ),
        )
    if (
        len(tok._tok) > ccfg.text.vocab_size
        or tok.eos_id != ccfg.text.eos_token_id
        and ccfg.text.eos_token_id != 2
    ):
        raise SystemExit(
            f"jaxdiff train: tokenizer {m.tokenizer!r} ({len(tok._tok)} tokens, EOS {tok.eos_id}) does "
            f"not fit the text tower (vocab {ccfg.text.vocab_size}, EOS {ccfg.text.eos_token_id})"
        )
    if workdir is not None and jax.process_index() == 0:  # the run's model is usable on its own
        shutil.copytree(here, Path(workdir) / "tokenizer", dirs_exist_ok=True)
        (Path(workdir) / "clip.json").write_text(
            json.dumps(clip_lib.config_to_dict(ccfg), indent=1)
        )
    return clip_task_lib.clip_task(train_cfg, ccfg, mesh=mesh, rules=rules, init_params=init), tok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="jaxdiff train", description="Train a model with jaxdiff's one loop."
    )
    ap.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
    ap.add_argument(
        "--workdir",
        required=True,
        help="checkpoints, TensorBoard logs, config and versions go here",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace another run's checkpoints in --workdir"
    )
    ap.add_argument("--coordinator-address", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument(
        "--init-timeout", type=int, default=300, help="seconds to wait for the other processes"
    )
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="start jax.distributed with the cluster's own settings (TPU pod, SLURM ...)",
    )
    known = [a for a in argv if not a.startswith("--config.")]
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    args = ap.parse_args(known)
    config = apply_overrides(load_config(args.config), overrides)
    _distributed(args)

    workdir = epath.Path(args.workdir)
    # logs, samples, config.json and versions.json: the workdir, or ./logs/NAME for a bucket workdir
    logdir = Path(args.workdir) if "://" not in args.workdir else Path("logs") / workdir.name
    optim = _dataclass(OptimConfig, dict(config.optim))
    loop_cfg = _dataclass(loop.LoopConfig, dict(config.loop))
    if config.mesh.rules not in sh.RULE_SETS:
        raise SystemExit(
            f"jaxdiff train: mesh.rules {config.mesh.rules!r}: choose one of {sorted(sh.RULE_SETS)}"
        )
    rules = sh.RULE_SETS[config.mesh.rules]
    mesh = sh.make_mesh(tuple(config.mesh.shape))
    if (
        config.task == "ldm"
        and config.ldm.get("text_token_loss")
        and not config.ldm.get("train_text_encoder")
    ):
        raise SystemExit(
            f"jaxdiff train: ldm.text_token_loss={config.ldm.text_token_loss} trains the text encoder's "
            "states: set ldm.train_text_encoder=True (or the loss to 0)"
        )
    try:
        source = pl.open_source(
            config.data.source, resolution=config.data.resolution, **shapes_options(config.data)
        )
    except ValueError as e:
        raise SystemExit(f"jaxdiff train: data: {e}") from None
    fingerprint = {
        k: v for k, v in _flatten(json_safe(config.to_dict())).items() if k not in RESUMABLE_KEYS
    }
    workdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    task, tok = build(config, mesh, rules, logdir)
    pipe = pl.make_pipeline(
        source,
        pl.PipelineConfig(
            resolution=config.data.resolution,
            global_batch=config.data.global_batch,
            seed=config.data.seed,
        ),
        tokenizer=tok,
    )
    write_run_info(
        logdir,
        config,
        is_main=jax.process_index() == 0,
        extra={"mesh": dict(mesh.shape), "devices": jax.device_count(), "workdir": str(workdir)},
    )
    with MetricWriter(
        logdir, is_main=jax.process_index() == 0, total_steps=loop_cfg.steps
    ) as writer:
        state = loop.train(
            task,
            optim,
            loop_cfg,
            mesh,
            rules,
            workdir,
            iter(pipe.dataset),
            lambda b: pl.to_global(b, mesh, rules),
            fingerprint=fingerprint,
            resumable=RESUMABLE_KEYS,
            overwrite=args.overwrite,
            writer=writer,
            examples_per_step=config.data.global_batch,
        )
        writer.log(
            f"done: step {int(state.step)}, checkpoints in {workdir / 'checkpoints'}, "
            f"TensorBoard logs in {logdir / 'tensorboard'}"
        )


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
