"""MTF Lab core: session logs, reward, fusion, evaluation and fusion policies for multi-task ranking."""

from mtf_core.errors import LogError

__all__ = ["LogError"]
__version__ = "0.1.0"
