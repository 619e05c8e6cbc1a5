"""Models for the experiments, built by name: ``build_model(name, **options)``.

Importing this package registers every model (explicit imports below, no plugin discovery).
Names: ``resnet18_cifar`` (classification); ``sr_plain``, ``sr_switched``, ``sr_condconv``,
``sr_involution``, ``edsr_baseline``, ``rrdb`` (super_resolution); ``vqvae`` (reconstruction).
Costs: :mod:`dynconv.models.flops`.
"""

from . import flops
from .flops import count_parameters, flops_per_pixel, model_summary
from .registry import LAYER_KINDS, LAYER_OPTIONS, MODELS, build_model, model_options, model_task, register_model
from .resnet_cifar import BasicBlock, ResNetCIFAR, resnet18_cifar
from .sr import EDSR, RRDBNet, SRNet, edsr_baseline, match_flops, rrdb, sr_condconv, sr_involution, sr_plain, sr_switched
from .vqvae import VQVAE, VectorQuantizerEMA, vqvae

__all__ = [
    "MODELS",
    "LAYER_KINDS",
    "LAYER_OPTIONS",
    "build_model",
    "register_model",
    "model_task",
    "model_options",
    "count_parameters",
    "flops_per_pixel",
    "model_summary",
    "match_flops",
    "flops",
    "ResNetCIFAR",
    "BasicBlock",
    "SRNet",
    "EDSR",
    "RRDBNet",
    "VQVAE",
    "VectorQuantizerEMA",
    "resnet18_cifar",
    "sr_plain",
    "sr_switched",
    "sr_condconv",
    "sr_involution",
    "edsr_baseline",
    "rrdb",
    "vqvae",
]
