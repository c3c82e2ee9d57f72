"""The shipped models, as package data of ``wsi_pipeline.models``.

This folder is mapped onto the package ``wsi_pipeline.models`` (pyproject.toml:
``[tool.setuptools.package-dir]``), so a wheel or ``pip install .`` carries the
checkpoints, their cards and ``index.yaml`` inside the installed package, where
:func:`wsi_pipeline.engine.registry.models_dir` finds them with ``importlib.resources``;
an editable install maps the package back onto this folder. Nothing to import here.
"""
