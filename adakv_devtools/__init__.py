"""Developer tools of the repository, not shipped in the wheel: the tiny test model
(``tiny_model``) and the real models' preparation (``prepare_model``). Run from the
repository root, e.g. ``python -m adakv_devtools.prepare_model``."""
