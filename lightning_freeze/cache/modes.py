"""Which modules compute the same in training and in eval mode (so their output can be cached)."""

from __future__ import annotations

from torch import nn

# Modules whose forward does not depend on ``training`` (exact types: a subclass may change that).
# fmt: off
MODE_FREE: frozenset[type] = frozenset(
    t
    for t in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, nn.EmbeddingBag,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.Softsign, nn.Hardswish,
        nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink, nn.Threshold, nn.GLU,
        nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
        nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.LayerNorm, nn.GroupNorm,
        getattr(nn, "RMSNorm", nn.LayerNorm),
    )
)
# fmt: on
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def mode_free(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) computes the same in training and eval mode."""
    return type(module) in MODE_FREE or (isinstance(module, DROPOUTS) and module.p == 0)


def mode_sensitive(module: nn.Module) -> list[nn.Module]:
    """Submodules whose output may depend on ``training`` (dropout with p > 0, batch norm, unknown types)."""
    return [m for m in module.modules() if not mode_free(m)]
