"""VQGAN image tokenizer: taming-compatible model, codebook-health quantizer, training, conversion, shard encoding."""
from vqgan.loss import LossConfig, NLayerDiscriminator, VQLoss, adaptive_weight
from vqgan.model import VQGAN, CheckpointError, VQGANConfig, load_state_strict, preset
from vqgan.modules import Decoder, Encoder
from vqgan.perceptual import LPIPSWeightsMissing, build_lpips
from vqgan.quantizer import CodebookUsage, QuantizerOutput, VectorQuantizer

__all__ = ["VQGAN", "CheckpointError", "CodebookUsage", "Decoder", "Encoder", "LPIPSWeightsMissing",
           "LossConfig", "NLayerDiscriminator", "QuantizerOutput", "VQGANConfig", "VQLoss", "VectorQuantizer",
           "adaptive_weight", "build_lpips", "load_state_strict", "preset"]
