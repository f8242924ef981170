"""The applications: ``sd3plugin-run`` (run.py), ``sd3plugin-bench`` (the bench package), the cache flows that load
pipelines and start processes (warm, verify), the doctor; they use the API (``sd3plugin.optimize``, the hook)."""
