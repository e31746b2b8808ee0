"""rayscreen: whole high-content microscopy screens on Ray.

Imports point one way: store <- stream <- train/infer <- analysis <- cli/jobs.
"""

__version__ = "0.1.0"
