"""trtforge: trained PyTorch checkpoint in, gated and versioned inference engines out."""

__version__ = "0.1.0"
