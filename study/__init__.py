"""attention-study: which attention design choices make a model generalize and stay robust."""

__version__ = "0.1.0"
