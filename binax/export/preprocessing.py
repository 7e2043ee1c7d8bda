"""What the training pipeline did to a raw image, recorded in the packed model file.

A model trained by binax never sees raw pixels: :func:`binax.data.normalize` maps each
raw value ``v`` in ``[0, max_value]`` (``uint8``; 255, or 16 for scikit-learn's digits) to
``u = v / max_value`` and then, by ``config.data.normalize``:

* ``'mean_std'``: ``(u − mean_c) / std_c`` per channel ``c`` (the dataset's constants);
* ``'unit'``: ``u`` in ``[0, 1]``;
* ``'sym'``: ``2u − 1`` in ``[−1, 1]``.

:class:`Preprocessing` records this with the image shape, and the packed model applies it
to raw integer images as a lookup table ``table[c, v]`` of ``max_value + 1`` float32
entries per channel, computed by :func:`binax.data.normalize` itself (so the inputs are
bit for bit those of the training pipeline, whatever the compiler does with a division).
``Preprocessing(None, shape)`` is a model that takes float inputs as they are (no raw
images): nothing is known about their range.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from binax import data
from binax.data.spec import Spec, normalize
from binax.errors import ConfigError

__all__ = ["Preprocessing", "as_preprocessing"]

MODES = ("mean_std", "unit", "sym")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Raw image → model input, as the training pipeline computed it.

    Attributes:
      normalize: ``'mean_std'``, ``'unit'``, ``'sym'`` (:func:`binax.data.normalize`), or
        None: the model takes float inputs as given (no raw images).
      shape: ``(H, W, C)`` of one image.
      max_value: the largest raw value (255; 16 for ``digits``).
      mean, std: per-channel constants on the ``[0, 1]`` scale (``'mean_std'``).
      dataset: the dataset's registry name, for the record.
      resize: how the evaluation pipeline brought an image to ``shape`` (ImageNet's central
        crop and resize), or None when the dataset's images already have it. The packed
        model does not resize: it takes images of ``shape``.
    """

    normalize: str | None
    shape: tuple[int, ...] | None = None
    max_value: int = 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dataset: str | None = None
    resize: str | None = None

    def __post_init__(self):
        if self.normalize is not None and self.normalize not in MODES:
            raise ConfigError(f"normalize={self.normalize!r} is not one of {MODES} (or None: float inputs as given).")
        if self.shape is not None:
            shape = tuple(self.shape)
            if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape):
                raise ConfigError(f"shape must be a tuple of positive ints such as (32, 32, 3); got {self.shape!r}.")
            object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        if not isinstance(self.max_value, (int, np.integer)) or not 1 <= self.max_value <= 255:
            raise ConfigError(f"max_value must be an integer in [1, 255] (raw uint8 pixels); got {self.max_value!r}.")
        if self.normalize == "mean_std":
            if self.mean is None or self.std is None:
                raise ConfigError("normalize='mean_std' needs the per-channel mean and std.")
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            if len(self.mean) != len(self.std) or min(self.std) <= 0:
                raise ConfigError(f"mean {self.mean} and std {self.std} must have one positive std per mean.")
            if self.shape is not None and len(self.mean) not in (1, self.shape[-1]):
                raise ConfigError(f"{len(self.mean)} channel means for images of shape {self.shape}.")

    # ---- construction

    @classmethod
    def for_dataset(cls, name: str, normalize: str = "mean_std") -> "Preprocessing":
        """The preprocessing ``binax.data`` applies to dataset ``name`` with ``normalize``
        (``config.data.normalize``; binax's default is ``'mean_std'``)."""
        spec = data.get_spec(name)
        data.check_normalize(normalize, spec)
        resize = None
        if spec.inception_crop:
            resize = (
                "evaluation images: the central square of 0.875 x the shorter side, bilinear "
                f"(antialiased) resize to {spec.image_shape[0]}x{spec.image_shape[1]}"
            )
        return cls(
            normalize,
            spec.image_shape,
            spec.max_value,
            spec.mean if normalize == "mean_std" else None,
            spec.std if normalize == "mean_std" else None,
            spec.name,
            resize,
        )

    @classmethod
    def from_config(cls, config: Any) -> "Preprocessing":
        """The preprocessing of a training config (``config.data.name`` and
        ``config.data.normalize``, with binax.data's defaults for what is missing)."""
        data = _get(config, "data") or {}
        name = _get(data, "name") or "fashion_mnist"
        return cls.for_dataset(name, _get(data, "normalize") or "mean_std")

    # ---- use

    @property
    def takes_raw(self) -> bool:
        """Whether the model takes raw integer images (False: float inputs as given)."""
        return self.normalize is not None

    def table(self, channels: int) -> np.ndarray:
        """``(channels, max_value + 1)`` float32: ``table[c, v]`` is the model input of raw
        value ``v`` in channel ``c``, computed by :func:`binax.data.normalize`."""
        mean = None if self.mean is None else np.broadcast_to(np.asarray(self.mean, np.float32), (channels,))
        std = None if self.std is None else np.broadcast_to(np.asarray(self.std, np.float32), (channels,))
        spec = Spec(self.dataset or "packed", "idx", None, None, mean=mean, std=std, max_value=self.max_value)
        raw = np.broadcast_to(np.arange(self.max_value + 1, dtype=np.float32)[:, None], (self.max_value + 1, channels))
        return np.ascontiguousarray(normalize(np.array(raw), spec, self.normalize).astype(np.float32).T)

    def describe(self) -> str:
        if not self.takes_raw:
            return "none: float inputs as given"
        what = {
            "unit": f"x / {self.max_value}",
            "sym": f"2 x / {self.max_value} - 1",
            "mean_std": f"(x / {self.max_value} - mean) / std, mean {list(self.mean)}, std {list(self.std)}",
        }[self.normalize]
        text = f"{self.normalize!r}: uint8 x in [0, {self.max_value}] -> {what}"
        return text + (f" ({self.dataset})" if self.dataset else "")

    def to_json(self) -> dict:
        return {
            "normalize": self.normalize,
            "shape": None if self.shape is None else list(self.shape),
            "max_value": int(self.max_value),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "dataset": self.dataset,
            "resize": self.resize,
            "raw_dtype": "uint8" if self.takes_raw else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Preprocessing":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})


def _get(obj, key):
    if obj is None:
        return None
    if hasattr(obj, "get"):
        return obj.get(key)
    return getattr(obj, key, None)


def as_preprocessing(value: Preprocessing | str | None, input_shape: Sequence[int] | None) -> Preprocessing:
    """``export``'s ``preprocessing=`` argument as a :class:`Preprocessing` with its shape.

    A string is a dataset name (:meth:`Preprocessing.for_dataset` with ``'mean_std'``);
    None is "float inputs as given". ``input_shape``, when given, must agree with the
    preprocessing's shape, and gives it when the preprocessing has none.
    """
    if isinstance(value, str):
        value = Preprocessing.for_dataset(value)
    elif value is None:
        value = Preprocessing(None)
    elif not isinstance(value, Preprocessing):
        raise ConfigError(
            "preprocessing must be a binax.export.Preprocessing, a dataset name such as 'fashion_mnist' "
            f"(binax.data.names()), or None (float inputs as given); got {value!r}."
        )
    if input_shape is not None:
        if isinstance(input_shape, (int, np.integer)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in input_shape
        ) or not len(input_shape):
            raise ConfigError(f"input_shape must be a tuple of positive ints such as (32, 32, 3); got {input_shape!r}.")
        shape = tuple(int(s) for s in input_shape)
        if value.shape is not None and value.shape != shape:
            raise ConfigError(
                f"input_shape {shape} differs from the preprocessing's image shape {value.shape} "
                f"({value.dataset or 'given'}); pass one of them."
            )
        value = dataclasses.replace(value, shape=shape)
    if value.shape is None:
        raise ConfigError(
            "the input shape is unknown: pass input_shape=(H, W, C), or a dataset's preprocessing "
            "(preprocessing='fashion_mnist', binax.export.Preprocessing.from_config(config))."
        )
    return value
