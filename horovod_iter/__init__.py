"""horovod_iter: a distributed input pipeline for PyTorch."""
__version__ = "0.1.0"
