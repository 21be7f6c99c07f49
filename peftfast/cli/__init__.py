"""The ``peftfast`` application: the command line and everything only it needs.

``peftfast train`` (data loading, the training loop, resumable checkpoints, data-parallel runs),
``generate``, ``merge``, ``inspect`` and ``demo``, and the base-model loading they share (embedded tiny
Llama, local directory or Hub id). It is built on the library in the package above (``patch``,
``save_adapter``, ...) and nothing in the library imports it. Developer tooling (``bench``, ``tune``,
the coverage matrix) lives in ``peftfast.devtools``.
"""
from .main import main

__all__ = ["main"]
