"""One seam per outside library for what sd3plugin uses of its private API. Each module names the
version it was written against; tests/test_compat.py fails loudly when an installed version changes it."""
