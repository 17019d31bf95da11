"""bidm: fully binarized (W1A1) diffusion models."""
