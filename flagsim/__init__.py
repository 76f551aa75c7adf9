"""flagsim: distributed batch image embedding and similarity search."""

__version__ = "0.1.0"
