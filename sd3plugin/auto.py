"""Zero-code import: ``import sd3plugin.auto`` enables the hook from the environment.

SD3PLUGIN_OVERRIDES: space-separated Hydra overrides (shell-style quoting allowed);
SD3PLUGIN_CONFIG: path of a YAML config. Both optional.
"""
import os
import shlex

from .hook import enable

HOOK = enable(os.environ.get("SD3PLUGIN_CONFIG") or None,
              shlex.split(os.environ.get("SD3PLUGIN_OVERRIDES", "")))
