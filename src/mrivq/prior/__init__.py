"""The learned prior over VQ-VAE-2 codes: model, training (``mrivq train-prior``), sampling (``mrivq sample``)."""

from mrivq.prior.model import CodePrior, CodeTransformer

__all__ = ["CodePrior", "CodeTransformer"]
