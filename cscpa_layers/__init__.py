"""CSC-PA layers: prototype attentions, pixel affinity loss and confidence masking.

The public API is listed in ``__all__``; everything else is private.
"""

from cscpa_layers.edge_attention import EdgePrototypeAttention, edge_prototype_attention
from cscpa_layers.edge_container import AdaptiveEdgeContainer
from cscpa_layers.edge_features import edge_mask, select_edge_features
from cscpa_layers.prototype_attention import (
    ForegroundPrototypeAttention,
    channel_prototypes,
    correlation_map,
    foreground_prototype_attention,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveEdgeContainer",
    "EdgePrototypeAttention",
    "ForegroundPrototypeAttention",
    "__version__",
    "channel_prototypes",
    "correlation_map",
    "edge_mask",
    "edge_prototype_attention",
    "foreground_prototype_attention",
    "select_edge_features",
]
