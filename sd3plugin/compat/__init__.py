"""One seam per outside library for the private APIs sd3plugin relies on (``compat.hydra``, ...).

Each module names what it uses and has a ``check()`` that returns the problems with the installed
version; ``tests/test_compat*.py`` fail loudly when one appears.
"""
