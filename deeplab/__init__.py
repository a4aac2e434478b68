"""DeepLab v2 semantic segmentation: model, data, training, inference, dense CRF, metrics, tracking."""

__version__ = "0.1.0"
