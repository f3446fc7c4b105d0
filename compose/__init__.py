"""The composition engine: adapter layers per method, stacking, fusion, drop and merges.

`compose` takes tensors and typed configs; it knows nothing of registries, stores or the Hub.
Sub-packages follow one layout per method (`config.py`, `layer.py`, `model.py`), as PEFT's tuners do.
Importing `compose` is cheap: torch is imported only by the modules that compute.
"""
