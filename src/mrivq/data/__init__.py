"""Slices in: NIfTI reading and validation, preprocessing, splits, the slice cache, the phantom, HipMRI facts.

Nothing here imports the rest of mrivq besides its base modules (errors, strict_json); settings
come in as arguments (``data`` below means a config's ``data`` section or anything like it).
"""
