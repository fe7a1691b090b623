"""Build script: the pure-Python package (the compiled extension is added by the CUDA build, see README)."""
from setuptools import setup

version = {}
with open("alast_kernels/_version.py") as f:
    exec(f.read(), version)

setup(version=version["__version__"])
