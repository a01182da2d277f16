"""Networks: the VQ-VAE-2 model and its EMA vector quantizer."""

from mrivq.models.quantize import QuantizerOutput, VectorQuantizer
from mrivq.models.vqvae2 import VQVAE2, Decoder, Encoder, NormResBlock, ResBlock, VQVAE2Output

__all__ = [
    "VQVAE2",
    "Decoder",
    "Encoder",
    "NormResBlock",
    "QuantizerOutput",
    "ResBlock",
    "VQVAE2Output",
    "VectorQuantizer",
]
