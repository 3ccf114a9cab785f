"""store-gateway: the in-store edge gateway for connected retail."""

__version__ = "0.1.0"
