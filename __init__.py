"""tokenpool: token-granularity pooling of many LLMs over a few accelerators."""

__version__ = "0.1.0"
