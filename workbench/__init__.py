"""workbench: multimodal multitask transformers (OmniVec2, CVPR 2024) on a laptop CPU, and at scale.

Sub-packages: ``data`` (the embedded digits benchmark, loaders, one media decoder), ``model`` (the
network, tokenizers, heads, attention capture), ``train`` (one Accelerate loop, three stage
objectives), ``evaluate``, ``explore`` (model logic behind the app), ``reports`` (papermill pipeline).
"""

__version__ = "0.1.0"
