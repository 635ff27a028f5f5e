"""Which frames make a clip: dense clips (Kinetics), segment sampling (SSv2), multi-view test sampling.

All randomness comes from a `numpy.random.Generator` passed in, so a seed gives the same clips anywhere.

- dense: `num_frames` frames `stride` apart. Training: a random start; test: the centre clip (1 temporal view)
  or `temporal_views` starts spread evenly from the first to the last possible start.
- segment: the video is cut into `num_frames` equal segments and one frame is taken from each. Training: a random
  frame inside each segment; test: the middle of each segment (with V temporal views: offsets (v + 0.5) / V
  inside each segment).

Short videos are never an error:
- dense: if the video has fewer frames than the clip spans ((num_frames - 1) * stride + 1), the clip LOOPS over
  the video (index modulo the frame count, as mmaction's `out_of_bound_opt="loop"`); the start is random in
  training and 0 at test.
- segment: with fewer frames than segments, segments are shorter than a frame and neighbouring segments share
  frames (indices repeat: the clip is padded by repetition, in time order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from pipeline.augment import ClipAugment

SAMPLINGS = ("dense", "segment")
TRAIN_CROPS = ("random_resized", "random", "center")


@dataclass(frozen=True)
class ClipSpec:
    """How a clip is cut from a video and turned into tokens (docs/interfaces.md).

    num_frames: frames per clip (T); sampling: 'dense' | 'segment'; stride: frame step for dense sampling;
    short_side: frames are resized so their short side is this; crop_size: square crop (a multiple of patch);
    tubelet_t, patch: tubelet shape t x p x p; train: random sampling/augmentation (else deterministic views);
    flip: random horizontal flip in training (leave off for SSv2: left/right is in the labels);
    temporal_views x spatial_views: evaluation views (spatial 1 = centre crop, 3 = three crops along the long side);
    train_crop: 'random_resized' (area 35-100 %, aspect 3/4-4/3, then resized to crop_size) | 'random' | 'center';
    augment: training augmentation drawn once per clip (pipeline/augment.py; a dict is accepted), off by default.
    """

    num_frames: int = 16
    sampling: str = "dense"
    stride: int = 2
    short_side: int = 128
    crop_size: int = 112
    tubelet_t: int = 2
    patch: int = 16
    train: bool = True
    flip: bool = False
    temporal_views: int = 1
    spatial_views: int = 1
    train_crop: str = "random_resized"
    augment: ClipAugment = field(default_factory=ClipAugment)

    def __post_init__(self):
        if isinstance(self.augment, dict):  # from JSON/YAML (to_dict, inference.json, Ray task arguments)
            object.__setattr__(self, "augment", ClipAugment.from_dict(self.augment))
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"ClipSpec.sampling={self.sampling!r}: expected one of {SAMPLINGS}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"ClipSpec.train_crop={self.train_crop!r}: expected one of {TRAIN_CROPS}")
        if self.num_frames < 1 or self.stride < 1 or self.tubelet_t < 1 or self.patch < 1:
            raise ValueError(f"ClipSpec: num_frames, stride, tubelet_t and patch must be >= 1 ({self})")
        if self.num_frames % self.tubelet_t:
            raise ValueError(f"ClipSpec: num_frames={self.num_frames} is not a multiple of tubelet_t={self.tubelet_t}")
        if self.crop_size % self.patch:
            raise ValueError(f"ClipSpec: crop_size={self.crop_size} is not a multiple of patch={self.patch}")
        if self.short_side < self.crop_size:
            raise ValueError(f"ClipSpec: short_side={self.short_side} is smaller than crop_size={self.crop_size}")
        if self.temporal_views < 1 or self.spatial_views not in (1, 3):
            raise ValueError(f"ClipSpec: temporal_views must be >= 1 and spatial_views 1 or 3 "
                             f"(got {self.temporal_views}x{self.spatial_views})")

    # Presets matching the paper's recipes (sizes can be overridden).
    @classmethod
    def kinetics(cls, train: bool = True, **kw) -> ClipSpec:
        base = {"num_frames": 32, "sampling": "dense", "stride": 2, "short_side": 256, "crop_size": 224,
                "flip": True, "temporal_views": 1 if train else 4, "spatial_views": 1 if train else 3}
        return cls(**{**base, "train": train, **kw})

    @classmethod
    def ssv2(cls, train: bool = True, **kw) -> ClipSpec:
        base = {"num_frames": 32, "sampling": "segment", "short_side": 256, "crop_size": 224, "flip": False,
                "temporal_views": 1, "spatial_views": 1 if train else 3}
        return cls(**{**base, "train": train, **kw})

    @classmethod
    def from_dict(cls, d: dict) -> ClipSpec:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ClipSpec: unknown fields {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_views(self) -> int:
        """V: 1 in training, temporal_views x spatial_views at test."""
        return 1 if self.train else self.temporal_views * self.spatial_views

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T', gh, gw): tubelets along time, height, width."""
        g = self.crop_size // self.patch
        return self.num_frames // self.tubelet_t, g, g

    @property
    def num_tokens(self) -> int:
        t, gh, gw = self.grid
        return t * gh * gw

    @property
    def token_dim(self) -> int:
        return self.tubelet_t * self.patch * self.patch * 3

    @property
    def tokens_shape(self) -> tuple[int, int, int]:
        """(V, L, K) of one clip's tokens."""
        return self.num_views, self.num_tokens, self.token_dim

    @property
    def span(self) -> int:
        """Frames a dense clip covers."""
        return (self.num_frames - 1) * self.stride + 1


def dense_indices(num_video_frames: int, num_frames: int, stride: int, *, train: bool,
                  rng: np.random.Generator | None = None, views: int = 1) -> np.ndarray:
    """(views, num_frames) int64 frame indices of dense clips (loops over videos shorter than the span)."""
    n = int(num_video_frames)
    if n < 1:
        raise ValueError("a video with no frames has no clips")
    span = (num_frames - 1) * stride + 1
    offsets = np.arange(num_frames, dtype=np.int64) * stride
    if n >= span:
        last = n - span
        if train:
            starts = _rng(rng).integers(0, last + 1, size=views)
        elif views == 1:
            starts = np.array([last // 2])
        else:
            starts = np.round(np.linspace(0, last, views)).astype(np.int64)
        return starts[:, None] + offsets[None, :]
    # Short video: loop.
    starts = _rng(rng).integers(0, n, size=views) if train else np.zeros(views, np.int64)
    return (starts[:, None] + offsets[None, :]) % n


def segment_indices(num_video_frames: int, num_segments: int, *, train: bool,
                    rng: np.random.Generator | None = None, views: int = 1) -> np.ndarray:
    """(views, num_segments) int64: one frame per equal segment (TSN / SSv2 sampling)."""
    n = int(num_video_frames)
    if n < 1:
        raise ValueError("a video with no frames has no clips")
    seg = n / num_segments
    base = np.arange(num_segments, dtype=np.float64) * seg
    if train:
        pos = base[None, :] + _rng(rng).random((views, num_segments)) * seg
    else:
        off = (np.arange(views, dtype=np.float64) + 0.5) / views
        pos = base[None, :] + off[:, None] * seg
    return np.clip(np.floor(pos).astype(np.int64), 0, n - 1)


def sample_indices(num_video_frames: int, spec: ClipSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """(temporal views, num_frames) frame indices for `spec` (1 temporal view in training)."""
    views = 1 if spec.train else spec.temporal_views
    if spec.sampling == "dense":
        return dense_indices(num_video_frames, spec.num_frames, spec.stride, train=spec.train, rng=rng, views=views)
    return segment_indices(num_video_frames, spec.num_frames, train=spec.train, rng=rng, views=views)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        raise ValueError("training sampling is random: pass a seeded numpy Generator (np.random.default_rng(seed))")
    return rng
