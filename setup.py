from setuptools import setup

# Everything else lives in pyproject.toml; this file only wires the cffi extension (API mode, out-of-line).
setup(cffi_modules=["src/python/baton/_build_native.py:ffibuilder"])
