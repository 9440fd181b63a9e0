"""Prune a model into smaller building blocks (LEGO, arXiv 2410.18287): magnitude, Wanda, SparseGPT, N:M."""
