"""Integer copies of the priors: coding probabilities that are the same bit for bit on any machine.

``fixed_point`` is the toolkit every copy uses (the exponential table that turns integer
logits into the coder's weights, checks of a file's tables by their least and greatest
values, comparison against a template, fingerprints); ``passes`` and ``transformer`` are the
copies of the two prior kinds of :mod:`mrivq.compression.priors`.
"""
