"""jaxswift: fine-tune, align, quantize, evaluate and serve LLMs with JAX.

Imports are lazy so that `python -m jaxswift.recipes.*` can configure devices before JAX starts.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "jaxswift.api", "save_model": "jaxswift.api", "generate": "jaxswift.api",
    "generate_ids": "jaxswift.api", "chat": "jaxswift.api", "Model": "jaxswift.api",
    "forward": "jaxswift.models.transformer", "ModelConfig": "jaxswift.models.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxswift' has no attribute {name!r}")
