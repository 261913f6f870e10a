"""curation: remove unwanted images from large image datasets with a frozen CLIP model and text alone.

Heavy dependencies (torch, open_clip, ray, mlflow) are imported inside the functions that need
them, so `import curation` and `curation --help` stay fast.
"""

__version__ = "0.1.0"
