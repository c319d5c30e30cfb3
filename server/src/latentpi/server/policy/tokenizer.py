"""The prompt tokenizer: PaliGemma's SentencePiece model with openpi's pi0 prompt layout.

Layout of one tokenized prompt of length L = max_len (pi0 and pi05_libero):

    [BOS] tokens(cleaned prompt) tokens("\\n") [0 ...]     mask: True ... True False ...

The trailing newline is openpi's "start of answer" token. Prompts longer than L are truncated (with a
warning, as openpi does) or, with `reject_overflow`, refused with a ValidationError so a server can
tell the client instead of acting on half an instruction.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import sentencepiece

from latentpi.protocol.errors import ValidationError
from latentpi.server.download import maybe_download
from latentpi.server.policy.tiny_corpus import libero_like_instructions

logger = logging.getLogger(__name__)

PALIGEMMA_TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
PALIGEMMA_VOCAB_SIZE = 257_152
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
# PaliGemma's model is 4.3 MB; anything far larger is not a tokenizer.
MAX_MODEL_BYTES = 64 * 2**20
DEFAULT_MAX_PROMPT_CHARS = 4096
TINY_TOKENIZER_FILENAME = "tiny_tokenizer.model"


def clean_prompt(prompt: str) -> str:
    """openpi's cleaning: strip, then `_` and newlines become spaces; case is kept."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


class PromptTokenizer:
    """Tokenizes one prompt into int32 tokens (max_len,) and a bool mask (max_len,)."""

    def __init__(
        self,
        model_proto: bytes,
        max_len: int,
        *,
        reject_overflow: bool = False,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> None:
        if max_len < 2:
            raise ValueError(f"max_len: expected at least 2 (BOS and newline), received {max_len}")
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as error:
            raise ValueError(f"tokenizer model: not a SentencePiece model ({error})") from error
        if self._processor.bos_id() < 0:
            raise ValueError("tokenizer model: expected a BOS token, received a model without one")
        self.max_len = max_len
        self.reject_overflow = reject_overflow
        self.max_prompt_chars = max_prompt_chars
        # Encoded once: openpi appends tokens("\n") after every prompt.
        self._newline = list(self._processor.encode("\n"))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        max_len: int,
        *,
        reject_overflow: bool = False,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> PromptTokenizer:
        """Loads from a local path, or from a URL (gs://, file://) through the download cache."""
        model = read_model_file(maybe_download(path))
        return cls(
            model, max_len, reject_overflow=reject_overflow, max_prompt_chars=max_prompt_chars
        )

    @classmethod
    def paligemma(
        cls,
        max_len: int,
        *,
        reject_overflow: bool = False,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> PromptTokenizer:
        """PaliGemma's tokenizer, downloaded into openpi's cache on first use."""
        return cls.from_file(
            PALIGEMMA_TOKENIZER_URL,
            max_len,
            reject_overflow=reject_overflow,
            max_prompt_chars=max_prompt_chars,
        )

    @property
    def vocab_size(self) -> int:
        return int(self._processor.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self._processor.bos_id())

    def encode(self, text: str) -> list[int]:
        """Raw SentencePiece ids of `text` (no cleaning, no BOS)."""
        return list(self._processor.encode(text))

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return str(self._processor.decode([int(i) for i in ids]))

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 (max_len,), mask bool (max_len,)) for one prompt."""
        if not isinstance(prompt, str):
            raise ValidationError("prompt", "a string", prompt)
        if len(prompt) > self.max_prompt_chars:
            raise ValidationError(
                "prompt", f"at most {self.max_prompt_chars} characters", f"{len(prompt)} characters"
            )
        ids = [self.bos_id, *self._processor.encode(clean_prompt(prompt)), *self._newline]
        if len(ids) > self.max_len:
            if self.reject_overflow:
                raise ValidationError(
                    "prompt",
                    f"at most {self.max_len} tokens (BOS and the closing newline included)",
                    f"{len(ids)} tokens",
                )
            logger.warning(
                "Prompt has %d tokens, more than max_token_len %d: truncating.",
                len(ids),
                self.max_len,
            )
            ids = ids[: self.max_len]
        tokens = np.full(self.max_len, PAD_ID, dtype=np.int32)
        tokens[: len(ids)] = ids
        mask = np.arange(self.max_len) < len(ids)
        return tokens, mask


def read_model_file(path: Path) -> bytes:
    """The bytes of a tokenizer model file, refusing files too large to be one."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model: expected a file, received {str(path)!r}")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ValueError(
            f"tokenizer model: expected at most {MAX_MODEL_BYTES} bytes, received {size} bytes"
        )
    return path.read_bytes()


def train_tiny_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 512) -> Path:
    """Trains a small SentencePiece BPE model on LIBERO-like instructions; returns its path.

    Same special ids as PaliGemma's (pad 0, eos 1, bos 2, unk 3), no normalization and no dummy
    prefix, a "\\n" piece and byte fallback, so every prompt tokenizes (no unknowns) with the same
    layout as the real tokenizer. Deterministic and fast (about 10 ms). `vocab_size` is an upper
    bound: the built-in corpus supports about 830 pieces, so larger requests give fewer (512 is
    exact). Ids stay far below PaliGemma's 257,152, so the tiny model configs' embedding fits.
    """
    if not 262 <= vocab_size <= PALIGEMMA_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size: expected 262..{PALIGEMMA_VOCAB_SIZE} (256 bytes + 5 specials + pieces), "
            f"received {vocab_size}"
        )
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(libero_like_instructions()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TINY_TOKENIZER_FILENAME
    partial = path.with_suffix(".partial")
    partial.write_bytes(model.getvalue())
    partial.replace(path)  # atomic: concurrent trainers never see half a file
    return path
