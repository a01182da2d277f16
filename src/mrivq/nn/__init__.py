"""Float networks: the VQ-VAE-2 (encoders, decoders, EMA vector quantizers) and the two priors over
its codes (the pass prior, the default, and the transformer prior).

Nothing here reads files, configs or metrics: modules take explicit keyword arguments and map
tensors to tensors, with shapes in their docstrings. The integer copies that code live in
:mod:`mrivq.compression.portable`; each prior offers ``fresh()`` and public parts for them.
"""

from mrivq.nn.layers import NormResBlock, ResBlock
from mrivq.nn.pass_prior import PassPrior
from mrivq.nn.quantize import QuantizerOutput, VectorQuantizer
from mrivq.nn.transformer_prior import CodeTransformer, TransformerPrior
from mrivq.nn.vqvae2 import VQVAE2, Decoder, Encoder, VQVAE2Output, code_grid_shapes

__all__ = [
    "VQVAE2", "CodeTransformer", "Decoder", "Encoder", "NormResBlock", "PassPrior", "QuantizerOutput",
    "ResBlock", "TransformerPrior", "VQVAE2Output", "VectorQuantizer", "code_grid_shapes",
]
