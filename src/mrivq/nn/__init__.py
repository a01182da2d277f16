"""Networks: the VQ-VAE-2 (encoders, decoders, EMA vector quantizers) and the code prior.

Nothing here reads files, configs or metrics: modules take explicit keyword arguments and map
tensors to tensors, with shapes in their docstrings.
"""

from mrivq.nn.layers import NormResBlock, ResBlock
from mrivq.nn.prior import CodePrior, CodeTransformer
from mrivq.nn.quantize import QuantizerOutput, VectorQuantizer
from mrivq.nn.vqvae2 import VQVAE2, Decoder, Encoder, VQVAE2Output, code_grid_shapes

__all__ = [
    "VQVAE2", "CodePrior", "CodeTransformer", "Decoder", "Encoder", "NormResBlock", "QuantizerOutput",
    "ResBlock", "VQVAE2Output", "VectorQuantizer", "code_grid_shapes",
]
