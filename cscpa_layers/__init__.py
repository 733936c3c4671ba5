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
from cscpa_layers.confidence_mask import ConfidenceMasking, MaskedImages, confidence_mask, keep_hard_schedule
from cscpa_layers.edge_attention import EdgePrototypeAttention, edge_prototype_attention
from cscpa_layers.edge_container import AdaptiveEdgeContainer
from cscpa_layers.edge_features import edge_mask, select_edge_features
from cscpa_layers.prototype_attention import (
    ForegroundPrototypeAttention,
    channel_prototypes,
    correlation_map,
    foreground_prototype_attention,
)
from cscpa_layers.pseudo_labels import (
    PseudoLabels,
    entropy_keep_mask,
    keep_percent_schedule,
    pseudo_labels,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveEdgeContainer",
    "ConfidenceMasking",
    "EdgePrototypeAttention",
    "ForegroundPrototypeAttention",
    "MaskedImages",
    "NEIGHBOUR_OFFSETS",
    "PixelAffinity",
    "PixelAffinityLoss",
    "PseudoLabels",
    "__version__",
    "channel_prototypes",
    "confidence_mask",
    "correlation_map",
    "edge_mask",
    "edge_prototype_attention",
    "entropy_keep_mask",
    "foreground_prototype_attention",
    "keep_hard_schedule",
    "keep_percent_schedule",
    "pixel_affinity",
    "pixel_affinity_loss",
    "pseudo_labels",
    "select_edge_features",
]
