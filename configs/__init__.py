"""Experiment configurations: plain modules whose ``config()`` returns a frozen dataclass.

This folder sits at the top of the repository and installs as ``kvcomm_jax.configs``
(see ``[tool.setuptools.package-dir]`` in pyproject.toml), so no generic top-level
``configs`` module is put into site-packages.
"""
