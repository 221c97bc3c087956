"""Stand-In on Wan2.1: identity-preserving video generation in plain PyTorch."""

__version__ = "0.1.0"
