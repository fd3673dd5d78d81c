"""Build script. The package is pure Python (reference and Triton backends); the C++/CUDA extension
is added by csrc/ (see docs/build.md once it exists)."""

from setuptools import setup

setup()
