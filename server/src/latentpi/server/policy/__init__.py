"""The policy around the model: LIBERO request → model inputs, model actions → LIBERO actions."""

from latentpi.server.policy.image import MODEL_IMAGE_SIZE, resize_with_pad
from latentpi.server.policy.libero import (
    IMAGE_SLOTS,
    VARIANT_DEFAULTS,
    LiberoPolicyTransform,
    PolicyVariant,
)
from latentpi.server.policy.normalize import Normalization, normalize, unnormalize
from latentpi.server.policy.tokenizer import (
    PALIGEMMA_TOKENIZER_URL,
    PromptTokenizer,
    clean_prompt,
    train_tiny_tokenizer,
)

__all__ = [
    "IMAGE_SLOTS",
    "MODEL_IMAGE_SIZE",
    "PALIGEMMA_TOKENIZER_URL",
    "VARIANT_DEFAULTS",
    "LiberoPolicyTransform",
    "Normalization",
    "PolicyVariant",
    "PromptTokenizer",
    "clean_prompt",
    "normalize",
    "resize_with_pad",
    "train_tiny_tokenizer",
    "unnormalize",
]
