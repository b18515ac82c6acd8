"""ediffi: eDiff-I's model library in pure PyTorch (EDM core, U-Net, samplers, guidance, experts).

Encoders live in `ediffi.encoders` and are imported on demand (transformers and open_clip are
heavy); nothing here imports ray or mlflow.
"""

from ediffi.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ediffi.conditioning import Cond, CondSpec, DropoutConfig, drop_embeddings, empty_cond
from ediffi.edm import EDMPrecond, NoiseDistribution, edm_loss, loss_weight
from ediffi.ensemble import (
    EDIFFI_BASE_QUANTILES,
    ExpertEnsemble,
    Interval,
    boundaries_from_quantiles,
    intervals_from_boundaries,
    load_ensemble,
    read_manifest,
    write_manifest,
)
from ediffi.guidance import Guided
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import PRESETS, build_denoiser, get_preset, preset_report
from ediffi.samplers import karras_sigmas, sample_dpmpp_2m, sample_euler, sample_heun
from ediffi.unet import UNet, UNetConfig

__all__ = [
    "EDIFFI_BASE_QUANTILES",
    "PRESETS",
    "CheckpointError",
    "Cond",
    "CondSpec",
    "DropoutConfig",
    "EDMPrecond",
    "ExpertEnsemble",
    "Guided",
    "Interval",
    "NoiseDistribution",
    "SamplerConfig",
    "UNet",
    "UNetConfig",
    "boundaries_from_quantiles",
    "build_denoiser",
    "drop_embeddings",
    "edm_loss",
    "empty_cond",
    "get_preset",
    "intervals_from_boundaries",
    "karras_sigmas",
    "load_checkpoint",
    "load_ensemble",
    "loss_weight",
    "preset_report",
    "read_manifest",
    "sample",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "save_checkpoint",
    "write_manifest",
]
