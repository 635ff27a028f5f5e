"""Clip-consistent training augmentation on uint8 frames `(T, H, W, 3)`, torch-free (it runs in the decode workers).

Every random choice is drawn ONCE per clip from the clip's generator (seeded by (seed, epoch, path), so a clip is
augmented the same way on any worker), and the same ops with the same arguments are applied to every frame:
a video is never augmented frame by frame (that would add flicker the model would have to learn away).

- RandAugment: timm's op table and magnitude->argument maps (`timm/data/auto_augment.py`: PIL ops, the "increasing"
  set that DeiT/VideoMAE use, each op applied with probability 0.5, magnitude noise std 0.5, like timm's
  `rand-m{M}-n{N}-mstd0.5-inc1`). timm's `RandAugment` object itself cannot be used: it draws ops, signs and
  interpolation from the global `random`/`np.random` on every call, i.e. per frame; here they are drawn once per
  clip. And `import timm` imports torch and torchvision (which cannot load beside the CPU torch here), so the
  self-contained `auto_augment.py` file (PIL and numpy only) is loaded on its own. AutoContrast and Equalize act on
  each frame's own histogram (same op, per-frame statistics), as in VideoMAE.
- Colour jitter: brightness, contrast and saturation factors drawn from [1-s, 1+s] and applied in a random order,
  like torchvision's `ColorJitter` (whose PIL backend uses the same PIL `ImageEnhance` calls as timm's ops).
- Random erasing: one box (area 2-33 %, aspect 0.3-3.3, timm's `RandomErasing` sampling) filled with random pixels,
  the same box and fill in every frame (VideoMAE's "cube" erasing). Hand-written: timm's and torchvision's erasing
  work on torch tensors, and the workers stay torch-free.
- Scale jitter lives in `transforms.spatial_views` (a resize before the crop).
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType

import numpy as np

# timm's defaults for RandAugment in DeiT / VideoMAE recipes.
RANDAUGMENT_OP_PROB = 0.5
RANDAUGMENT_MAGNITUDE_STD = 0.5
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


@dataclass(frozen=True)
class ClipAugment:
    """What to apply to a training clip (the decode-worker part of `data.augment`); all off by default."""

    randaugment_layers: int = 0
    randaugment_magnitude: float = 9.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    scale_jitter: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "scale_jitter", tuple(float(v) for v in self.scale_jitter))  # lists from JSON/YAML
        if self.randaugment_layers < 0 or self.randaugment_magnitude < 0:
            raise ValueError(f"ClipAugment: randaugment layers/magnitude must be >= 0 ({self})")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"ClipAugment: color_jitter={self.color_jitter} must be in [0, 1)")
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"ClipAugment: random_erasing={self.random_erasing} is a probability")
        lo, hi = self.scale_jitter if len(self.scale_jitter) == 2 else (0, -1)
        if not 0 < lo <= hi:
            raise ValueError(f"ClipAugment: scale_jitter={self.scale_jitter} must be (min, max), 0 < min <= max")

    @property
    def active(self) -> bool:
        """Anything to do on the frames after the crop (scale jitter acts before it)."""
        return self.randaugment_layers > 0 or self.color_jitter > 0 or self.random_erasing > 0

    @classmethod
    def from_dict(cls, d: dict) -> ClipAugment:
        return cls(**d)


@dataclass
class AugmentParams:
    """One clip's draw: PIL ops (timm op name, arguments) in order, and an optional erase box with its fill."""

    ops: list[tuple[str, tuple]] = field(default_factory=list)
    erase: tuple[int, int, int, int] | None = None  # (y, x, h, w)
    erase_fill: np.ndarray | None = None  # (h, w, 3) uint8


@lru_cache(maxsize=1)
def timm_auto_augment() -> ModuleType:
    """timm's `data/auto_augment.py`, loaded as a standalone module (it imports only PIL and numpy), so neither
    torch nor torchvision is imported in a decode worker."""
    spec = importlib.util.find_spec("timm")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = f"{loc}/data/auto_augment.py"
        try:
            file_spec = importlib.util.spec_from_file_location("_mone_timm_auto_augment", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        except (FileNotFoundError, ImportError) as e:
            raise ImportError(f"RandAugment needs timm's data/auto_augment.py ({path}): {e}; "
                              "`pip install timm` or set data.augment.randaugment_layers=0") from e
        return module
    raise ImportError("RandAugment needs timm (its PIL op table): `pip install timm`, or set "
                      "data.augment.randaugment_layers=0")


def sample_params(aug: ClipAugment, rng: np.random.Generator, height: int, width: int) -> AugmentParams:
    """Draws everything random about one clip's augmentation from `rng` (nothing else is random later)."""
    params = AugmentParams()
    if aug.color_jitter > 0:
        s = aug.color_jitter
        jitter = [(name, (float(rng.uniform(1 - s, 1 + s)),)) for name in ("Brightness", "Contrast", "Color")]
        params.ops += [jitter[i] for i in rng.permutation(len(jitter))]
    if aug.randaugment_layers > 0:
        params.ops += _randaugment_ops(aug, rng)
    if aug.random_erasing > 0 and rng.random() < aug.random_erasing:
        params.erase = _erase_box(rng, height, width)
        if params.erase is not None:
            _, _, h, w = params.erase
            params.erase_fill = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return params


def _randaugment_ops(aug: ClipAugment, rng: np.random.Generator) -> list[tuple[str, tuple]]:
    aa = timm_auto_augment()
    names = aa._RAND_INCREASING_TRANSFORMS
    hparams = {**aa._HPARAMS_DEFAULT}
    upper = max(aa._LEVEL_DENOM, aug.randaugment_magnitude)  # magnitudes above timm's 10 are allowed (mmax)
    ops = []
    for name in rng.choice(names, size=aug.randaugment_layers, replace=True):
        if rng.random() > RANDAUGMENT_OP_PROB:
            continue
        m = float(np.clip(rng.normal(aug.randaugment_magnitude, RANDAUGMENT_MAGNITUDE_STD), 0.0, upper))
        level_fn = aa.LEVEL_TO_ARG[str(name)]
        args = tuple(_seeded_python_random(rng, level_fn, m, hparams)) if level_fn else ()
        if str(name).startswith("Posterize"):
            # timm maps the top magnitudes to "keep 0 bits"; Pillow >= 10 refuses that (bits must be 1-8).
            args = (max(1, int(args[0])),)
        ops.append((str(name), args))
    return ops


def _seeded_python_random(rng: np.random.Generator, fn, *args):
    """Calls one of timm's level functions (they flip the sign with the global `random`) with `random` seeded from
    the clip's generator, then puts the global state back: the draw is the clip's, and nobody else's state moves."""
    state = random.getstate()
    random.seed(int(rng.integers(0, 2**63 - 1)))
    try:
        return fn(*args)
    finally:
        random.setstate(state)


def _erase_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int] | None:
    """timm's RandomErasing sampling: up to 10 tries for a box of random area and aspect ratio that fits."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*ERASE_AREA)
        aspect = math.exp(rng.uniform(*ERASE_LOG_ASPECT))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def apply_params(clip: np.ndarray, params: AugmentParams) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H, W, 3) uint8: the same ops, arguments and erase box on every frame."""
    if not params.ops and params.erase is None:
        return clip
    out = np.array(clip, dtype=np.uint8, copy=True)  # (T, H, W, 3), writable even if clip was a view
    if params.ops:
        from PIL import Image

        aa = timm_auto_augment()
        # Fixed interpolation: timm would pick bilinear or bicubic at random on every call (per frame).
        kwargs = {"fillcolor": aa._FILL, "resample": Image.Resampling.BILINEAR}
        for t in range(out.shape[0]):
            img = Image.fromarray(out[t])
            for name, args in params.ops:
                img = aa.NAME_TO_OP[name](img, *args, **kwargs)
            out[t] = np.asarray(img)
    if params.erase is not None:
        y, x, h, w = params.erase
        out[:, y : y + h, x : x + w] = params.erase_fill  # (T, h, w, 3) <- (h, w, 3)
    return out


def augment_clip(clip: np.ndarray, aug: ClipAugment, rng: np.random.Generator) -> np.ndarray:
    """Draws one clip's parameters from `rng` and applies them to every frame of `clip` (T, H, W, 3) uint8."""
    if not aug.active:
        return clip
    return apply_params(clip, sample_params(aug, rng, clip.shape[1], clip.shape[2]))
