"""baton: a local coordination daemon for multi-agent work.

Importing baton never requires the native library: ``baton.native.AVAILABLE`` says whether libbaton loaded,
and the pure-Python twins (wire codec, Python router) serve when it did not.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
