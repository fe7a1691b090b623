"""Fine-tuning methods over a timm ``VisionTransformer``, one module each, behind one contract.

``create(name, model, **options)`` builds one; ``available()`` lists the names. See
:mod:`alast_kernels.methods.base` for the contract and ``docs/adding-a-method.md`` for how to add one.
"""
from .base import Method, available, create, method_class, options_of, register, set_trainable

# Each module registers its method(s) on import; the order here is the order `available()` lists.
from . import full, linear, lora, alast, sparse_tuning, evit  # noqa: E402,F401  isort: skip
from . import losa, synqt  # noqa: E402,F401  isort: skip

__all__ = ["Method", "available", "create", "method_class", "options_of", "register", "set_trainable"]
