"""inference_core: the bundled DeepSeek-family inference server that sentinel watches.

It never imports :mod:`sentinel`; it runs and is useful on its own.
"""

__version__ = "0.1.0"
