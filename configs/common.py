"""What every training config shares: the schema lives in the package (``binax.config``)
so that code outside this repository can build configs too; the config files import it
from here as ``common``.
"""

from binax.config import (  # noqa: F401
    MIN_EPOCHS_FOR_EPOCH_PROGRESS,
    base_config,
    model_config,
    parse_arg,
    progress_unit,
    shrink_quick,
)
