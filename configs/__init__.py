"""Training configs: ``get_config(arg)`` per file; shared keys in ``configs/common.py``."""
