"""norm-experiments: which normalization should a 3D segmentation network use at batch sizes 1-8?"""

__version__ = "0.1.0"
