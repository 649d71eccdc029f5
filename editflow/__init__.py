"""editflow: declarative, cached pipelines for diffusion-based image editing.

The code lives in four folders mapped into this package: ``engine/`` (recipes, planning,
execution), ``stages/`` (the stage kinds and the method math), ``models/`` (model references,
identity, loading, the built-in tiny model) and ``cache/`` (the content-addressed zarr store).
The modules here are what they share: errors, recipe documents, input and output files.
"""

__version__ = "0.1.0"
