"""Codes as bits: entropy coding, the codes file, and standard codecs at a given rate."""
