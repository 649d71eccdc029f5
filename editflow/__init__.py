"""editflow: declarative, cached pipelines for diffusion-based image editing.

Floors, each importing only the ones below it (an import-linter ``layers`` contract):

- ``editflow.cli`` (``editflow/cli/``): the commands, and what only they use: sweeps,
  locks, figure checks, reports, progress display.
- ``editflow.executors`` (``executors/``): running a plan elsewhere (on a Ray cluster).
- ``editflow.engine`` (``engine/``): recipes, planning, keys, in-process execution.
- ``editflow.files`` (``editflow/files/``): the input files a recipe reads and the images it
  exports.
- ``editflow.stages`` (``stages/``): the stage kinds, one folder per method.
- ``editflow.models`` (``models/``) and ``editflow.cache`` (``cache/``), side by side.
- The base, here: errors, lazy imports, recipe documents, the platform fingerprint.
"""

__version__ = "0.1.0"

# The Python API (editflow.api), imported on first use: `import editflow` stays light.
_API = ("run", "plan", "validate", "explain")


def __getattr__(name: str) -> object:
    if name in _API:
        import importlib

        # By name, not an import statement: the base floor does not depend on the API's.
        return getattr(importlib.import_module("editflow.api"), name)
    raise AttributeError(f"module 'editflow' has no attribute {name!r}")
