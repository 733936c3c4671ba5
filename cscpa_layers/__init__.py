"""CSC-PA layers: prototype attentions, pixel affinity loss and confidence masking.

The public API is listed in ``__all__``; everything else is private.
"""

from cscpa_layers.affinity_loss import (
    NEIGHBOUR_OFFSETS,
    PixelAffinity,
    PixelAffinityLoss,
    pixel_affinity,
    pixel_affinity_loss,
)
from cscpa_layers.prototype_attention import (
    ForegroundPrototypeAttention,
    channel_prototypes,
    correlation_map,
    foreground_prototype_attention,
)

__version__ = "0.1.0"

__all__ = [
    "ForegroundPrototypeAttention",
    "NEIGHBOUR_OFFSETS",
    "PixelAffinity",
    "PixelAffinityLoss",
    "__version__",
    "channel_prototypes",
    "correlation_map",
    "foreground_prototype_attention",
    "pixel_affinity",
    "pixel_affinity_loss",
]
