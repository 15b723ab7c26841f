"""apex-local: distributed deep Q-learning (Ape-X, R2D2, Gorila) as real processes on one box.

``apex_local.train(...)`` and ``apex_local.evaluate(...)`` mirror the CLI (see ``apex_local.api``).
"""
__version__ = "0.1.0"
__all__ = ["train", "evaluate", "load_config", "__version__"]


def __getattr__(name):  # lazy: importing apex_local.config must not pull in torch
    if name in ("train", "evaluate"):
        from apex_local import api

        return getattr(api, name)
    if name == "load_config":
        from apex_local.config import load_config

        return load_config
    raise AttributeError(f"module 'apex_local' has no attribute {name!r}")
