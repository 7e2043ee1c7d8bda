"""binax: binary neural networks in JAX/Flax.

Submodules: ``binarizers`` (forward/backward estimators, registered with their
``quantizer`` descriptors), ``packed`` (bit packing, popcount kernels, conv geometry),
``ops`` (training fast path), ``layers``, ``models`` (registry, layer chains, tracer),
``summary`` (bit-aware model summary), ``folding`` (BN -> sign thresholds), ``data``,
``train``, ``config`` (the training config's keys and defaults), ``transforms``,
``mismatch`` (with ``smoothing``: the smoothed-loss gradient), ``export`` (bit-packed inference).
"""

import importlib as _importlib

__version__ = "0.1.0"

# Imported on first attribute access (`binax.train.restore_variables` after `import binax`):
# they pull in orbax, tensorboardX, optax or the data pipelines, which the core does not need.
_LAZY_SUBMODULES = (
    "config",
    "data",
    "errors",
    "export",
    "folding",
    "mismatch",
    "mismatch_study",
    "ops",
    "packed",
    "quantizer",
    "recipes",
    "smoothing",
    "train",
)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f"binax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'binax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


from binax import binarizers  # noqa: F401
from binax import layers  # noqa: F401,E402
from binax import models  # noqa: F401,E402
from binax import transforms  # noqa: F401,E402

# Last: the function shadows the submodule's name, so `binax.summary(model, shape)` works
# (the module stays importable as `from binax.summary import ModelSummary`).
from binax.summary import summary  # noqa: F401,E402
