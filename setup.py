"""Shim so that `pip install -e .` also works with tooling that predates PEP 660; metadata lives in pyproject.toml."""
from setuptools import setup

setup()
