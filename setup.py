"""Build script.

fastcam is pure Python today: every backend other than the reference arrives as its own
piece (the compiled extension ``fastcam._C`` from ``csrc/``, the Triton kernels in
``fastcam/triton/``), and ``fastcam.backends()`` says which are present. When ``csrc/``
gains sources, this file builds them ahead of time as ``fastcam._C`` (the metadata lives
in pyproject.toml).
"""

from setuptools import setup

setup()
