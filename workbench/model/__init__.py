"""The OmniVec2 network: tokenizers, f / A / g, heads, masked-prediction decoders, capture and silencing.

Public surface (see ``omnivec2.py`` for the data flow and ``checkpoint.py`` for the directory format)::

    from workbench.model import OmniVec2, build_model
    model = build_model(cfg, tasks)                  # tasks: list[TaskSpec]
    model.forward_single(batch) / model.forward_pair(a, b)
    model.forward_masked(batch, ratio) / model.forward_masked_pair(a, b, ra, rb)
    with model.capture_attention() as maps: ...
    with model.silence_heads([("f", 0, 1)]): ...
    model.save_pretrained(dir, cfg, text_tokenizer); OmniVec2.from_pretrained(dir)

DeepSense-v2's own network (modality-specific encoders, cross-attention fusion): ``deepsense.py``.
"""

from workbench.model.checkpoint import read_checkpoint_config
from workbench.model.deepsense import DeepSense
from workbench.model.masking import Masked, bert_corruption, random_masking
from workbench.model.omnivec2 import MaskedOutput, OmniVec2, build_model
from workbench.model.text_tokenizer import TextTokenizer

__all__ = [
    "DeepSense",
    "Masked",
    "MaskedOutput",
    "OmniVec2",
    "TextTokenizer",
    "bert_corruption",
    "build_model",
    "random_masking",
    "read_checkpoint_config",
]
