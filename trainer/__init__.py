"""trainer: YOLOX on Pascal VOC or COCO data, evaluation, and the streamd model bundle."""

__version__ = "0.1.0"
