"""The flat token batch a model forward sees; defined beside the kernels that read it (kernels/batch.py)."""

from meshserve.kernels.batch import PAD_BLOCK, BatchMetadata

__all__ = ["PAD_BLOCK", "BatchMetadata"]
