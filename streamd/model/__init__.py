"""The model I/O contract shared by trainer and streamd (NumPy only, no torch)."""

from streamd.model.bundle import Bundle, BundleMeta, load_bundle, sha256_file, write_bundle
from streamd.model.detections import Detections
from streamd.model.postprocess import nms, postprocess
from streamd.model.preprocess import Letterbox, letterbox, letterbox_batch

__all__ = [
    "Bundle",
    "BundleMeta",
    "Detections",
    "Letterbox",
    "letterbox",
    "letterbox_batch",
    "load_bundle",
    "nms",
    "postprocess",
    "sha256_file",
    "write_bundle",
]
