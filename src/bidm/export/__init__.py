"""Packed export of binarized models and the XNOR/AND-popcount runtime."""
