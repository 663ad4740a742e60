"""cgw: the community edge gateway."""

__version__ = "0.1.0"
