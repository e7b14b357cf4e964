"""Refiners: lattice -> drafts (identity, n-gram p-best, neural rescoring)."""
