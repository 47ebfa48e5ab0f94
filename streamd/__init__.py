"""streamd: real-time YOLOX detection on live video, with recordings and ZeroMQ output."""

__version__ = "0.1.0"
