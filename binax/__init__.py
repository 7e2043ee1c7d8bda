"""binax: binary neural networks in JAX/Flax.

Submodules: ``binarizers`` (forward/backward estimators, registered with their
``quantizer`` descriptors), ``packed`` (bit packing, popcount kernels, conv geometry),
``ops`` (training fast path), ``layers``, ``models`` (registry, layer chains, tracer),
``summary`` (bit-aware model summary), ``folding`` (BN -> sign thresholds), ``data``,
``train``, ``transforms``, ``mismatch``, ``export`` (bit-packed inference).
"""

__version__ = "0.1.0"

from binax import binarizers  # noqa: F401
from binax import layers  # noqa: F401,E402
from binax import models  # noqa: F401,E402
from binax import transforms  # noqa: F401,E402

# Last: the function shadows the submodule's name, so `binax.summary(model, shape)` works
# (the module stays importable as `from binax.summary import ModelSummary`).
from binax.summary import summary  # noqa: F401,E402
