"""How to sample, as one frozen value: what `Pipeline.txt2img` / `img2img`, `jaxdiff txt2img` (its flags,
its PNG metadata, a model's jaxdiff_sampling.json), the demo, the study and the training sample grid take.

Checked once, when made, before anything is loaded or compiled; a bad value raises a ``SamplingError``
that names the field and says what would be right.

    params = SamplingParams(steps=20, guidance=7.5, sampler="euler", seed=0)
    params.replace(guidance=3.0, guidance_interval=parse_interval("0,0.5"))
    SamplingParams.from_dict(json.loads(text)).to_dict()                      # JSON, PNG metadata
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from jaxdiff.diffusion.schedules import SAMPLERS


class GenerationError(ValueError):
    """A request that cannot run (bad size, strength, prompt count, latents shape ...), raised before
    anything is compiled."""


class SamplingError(GenerationError):
    """A sampling setting that cannot be used; ``field`` names it (None: the whole set)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of a run (not its prompts or images), with diffusers' SD 1 defaults."""

    steps: int = 50  # denoising steps
    guidance: float = 7.5  # classifier-free guidance w: 1 = conditional alone, 0 = unconditional
    guidance_rescale: float = 0.0  # Lin et al. 2023's rescale, in [0, 1]
    # (lo, hi): guide only the steps with lo <= t / T <= hi, the conditional model alone on the others
    # (Kynkaanniemi et al. 2024); None: every step
    guidance_interval: tuple[float, float] | None = None
    sampler: str | None = None  # None: the checkpoint's own scheduler
    eta: float = 0.0  # DDIM's eta (0: deterministic)
    clip_skip: int | None = None  # condition on the text encoder's layer -1 - clip_skip
    seed: int = 0  # image i uses seed + i
    num_images: int = 1  # per prompt
    height: int | None = None  # pixels; None: the model's size (img2img: the image's)
    width: int | None = None
    strength: float = 0.8  # img2img: 0 keeps the image, 1 ignores it

    def __post_init__(self):
        # normalised as well as checked: numpy scalars, whole floats from JSON and [lo, hi] lists become
        # plain ints, floats and tuples, so equal settings compare (and hash) equal
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("steps", _whole("steps", self.steps, 1))
        put("num_images", _whole("num_images", self.num_images, 1))
        put("seed", _whole("seed", self.seed, None))
        if self.clip_skip is not None:
            put("clip_skip", _whole("clip_skip", self.clip_skip, 0, " (None: the last layer)"))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                value = _whole(name, value, 1)
                if value % 8:
                    raise SamplingError(
                        name, f"{name} must be a positive multiple of 8 (pixels), got {value}"
                    )
                put(name, value)
        put("guidance", _real("guidance", self.guidance, "a finite number"))
        put(
            "guidance_rescale",
            _real("guidance_rescale", self.guidance_rescale, "in [0, 1]", 0.0, 1.0),
        )
        put("eta", _real("eta", self.eta, "finite and >= 0", 0.0))
        put("strength", _real("strength", self.strength, "in [0, 1]", 0.0, 1.0))
        if self.guidance_interval is not None:
            put("guidance_interval", _interval(self.guidance_interval))
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SamplingError(
                "sampler",
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)} "
                "(or None: the checkpoint's own)",
            )

    def replace(self, **changes) -> SamplingParams:
        """A copy with ``changes`` (checked); an unknown name is refused with the list of known ones."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(
                f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {', '.join(FIELDS)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as plain JSON values (the interval as [lo, hi])."""
        out = {f: getattr(self, f) for f in FIELDS}
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        return out

    @classmethod
    def from_dict(cls, d, base: SamplingParams | None = None) -> SamplingParams:
        """``base`` (default: the defaults) with the fields ``d`` sets; keys that are not fields are refused."""
        if not isinstance(d, dict):
            raise SamplingError(
                None,
                f"expected an object with keys among {', '.join(FIELDS)}, got {type(d).__name__}",
            )
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise SamplingError(
                None, f"expected keys among {', '.join(FIELDS)}; unknown: {', '.join(unknown)}"
            )
        return (base or cls()).replace(**d)


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def parse_interval(text: str) -> tuple[float, float]:
    """A guidance interval written "LO,HI" (a flag's text) -> (lo, hi), checked like the field."""
    try:
        lo, hi = (float(part) for part in str(text).split(","))
    except ValueError:
        raise SamplingError(
            "guidance_interval", f"guidance_interval must be LO,HI (two numbers), got {text!r}"
        ) from None
    return _interval((lo, hi))


def _whole(name: str, value, lo: int | None, hint: str = "") -> int:
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole:
        raise SamplingError(name, f"{name} must be a number (whole), got {value!r}")
    if lo is not None and value < lo:
        raise SamplingError(name, f"{name} must be at least {lo}{hint}, got {value}")
    return int(value)


def _real(name: str, value, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not lo <= value <= hi:
        raise SamplingError(name, f"{name} must be {what}, got {value!r}")
    return float(value)


def _interval(value) -> tuple[float, float]:
    try:
        if isinstance(value, (str, bytes)):  # "0,0.5" is text for parse_interval, not two numbers
            raise TypeError
        lo, hi = (_real("guidance_interval", v, "numbers") for v in value)
    except (TypeError, ValueError):
        raise SamplingError(
            "guidance_interval",
            f"guidance_interval must be two numbers (lo, hi), got {value!r}"
            + (' (text "LO,HI" is read by parse_interval)' if isinstance(value, str) else ""),
        ) from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise SamplingError(
            "guidance_interval",
            f"guidance_interval must have 0 <= lo <= hi <= 1 (fractions of the schedule's "
            f"timesteps), got ({lo:g}, {hi:g})",
        )
    return lo, hi
