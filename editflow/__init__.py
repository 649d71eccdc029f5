"""editflow: declarative, cached pipelines for diffusion-based image editing.

The code lives in three folders mapped into this package: ``engine/`` (recipes, planning,
execution), ``stages/`` (the method math) and ``cache/`` (the content-addressed zarr store).
"""

__version__ = "0.1.0"
