"""PromptTokenizer on a freshly trained tiny SentencePiece model: layout, padding, cleaning, limits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from latentpi.protocol.errors import ValidationError
from latentpi.server.policy import tokenizer as tok
from latentpi.server.policy.tiny_corpus import libero_like_instructions
from latentpi.server.policy.tokenizer import PromptTokenizer, clean_prompt, train_tiny_tokenizer

MAX_LEN = 48


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> PromptTokenizer:
    return PromptTokenizer.from_file(model_path, MAX_LEN)


@pytest.fixture(scope="module")
def processor(model_path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


def test_tiny_model_has_paligemma_special_ids(processor: sentencepiece.SentencePieceProcessor):
    assert (processor.pad_id(), processor.eos_id(), processor.bos_id(), processor.unk_id()) == (
        0,
        1,
        2,
        3,
    )
    assert processor.id_to_piece(0) == "<pad>"
    assert processor.get_piece_size() == 512
    assert processor.encode("\n") == [processor.piece_to_id("\n")]


def test_training_is_deterministic(model_path: Path, tmp_path: Path):
    again = train_tiny_tokenizer(tmp_path, vocab_size=512)
    assert again.read_bytes() == model_path.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_layout_bos_prompt_newline_then_padding(
    tokenizer: PromptTokenizer, processor: sentencepiece.SentencePieceProcessor
):
    prompt = "pick up the black bowl next to the ramekin and place it on the plate"
    tokens, mask = tokenizer.tokenize(prompt)
    body = processor.encode(prompt)
    n = len(body) + 2
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    assert tokens.shape == mask.shape == (MAX_LEN,)
    assert tokens[0] == 2
    assert tokens[1 : n - 1].tolist() == body
    assert tokens[n - 1] == processor.piece_to_id("\n")
    assert np.all(tokens[n:] == 0)
    assert mask.tolist() == [True] * n + [False] * (MAX_LEN - n)
    assert tokenizer.decode(tokens[1 : n - 1]) == prompt


def test_libero_instructions_tokenize_without_unknowns_and_compactly(tokenizer: PromptTokenizer):
    for prompt in libero_like_instructions()[:30]:
        tokens, mask = tokenizer.tokenize(prompt)
        assert 3 not in tokens.tolist()
        # Whole words were learned: far fewer tokens than characters.
        assert mask.sum() < len(prompt) / 2


def test_cleaning_strips_and_maps_underscores_and_newlines_keeping_case(
    tokenizer: PromptTokenizer, processor: sentencepiece.SentencePieceProcessor
):
    assert clean_prompt("  Put_the bowl\non_the plate \n") == "Put the bowl on the plate"
    # Strip happens first, so a leading underscore becomes a leading space (as in openpi).
    assert clean_prompt("_open the drawer_") == " open the drawer "
    tokens, mask = tokenizer.tokenize("\tPut_the bowl\non_the plate  ")
    n = int(mask.sum())
    assert tokens[1 : n - 1].tolist() == processor.encode("Put the bowl on the plate")
    lower, _ = tokenizer.tokenize("put the bowl on the plate")
    assert not np.array_equal(tokens, lower)


def test_unicode_and_digits_fall_back_to_bytes(tokenizer: PromptTokenizer):
    prompt = "stack 12 mugs ☃ déjà vu"
    tokens, mask = tokenizer.tokenize(prompt)
    n = int(mask.sum())
    assert 3 not in tokens[:n].tolist()
    assert tokenizer.decode(tokens[1 : n - 1]) == prompt


def _long_prompt(tokenizer: PromptTokenizer, n_tokens: int) -> str:
    """A prompt of words whose layout (BOS + tokens + newline) has at least n_tokens tokens."""
    words = ["pick", "up", "the", "bowl", "and", "place", "it", "on", "the", "plate"]
    prompt = words[0]
    while len(tokenizer.encode(prompt)) + 2 < n_tokens:
        prompt += " " + words[len(prompt.split()) % len(words)]
    return prompt


def test_truncation_keeps_the_first_tokens_and_warns(
    tokenizer: PromptTokenizer, caplog: pytest.LogCaptureFixture
):
    prompt = _long_prompt(tokenizer, 70)
    full = [2, *tokenizer.encode(prompt), *tokenizer.encode("\n")]
    assert len(full) > MAX_LEN
    with caplog.at_level(logging.WARNING, logger=tok.__name__):
        tokens, mask = tokenizer.tokenize(prompt)
    assert tokens.tolist() == full[:MAX_LEN]
    assert mask.all()
    assert any("truncating" in record.message for record in caplog.records)


def test_exact_fit_is_not_truncated(
    model_path: Path, tokenizer: PromptTokenizer, caplog: pytest.LogCaptureFixture
):
    prompt = _long_prompt(tokenizer, MAX_LEN)
    full = [2, *tokenizer.encode(prompt), *tokenizer.encode("\n")]
    short = PromptTokenizer.from_file(model_path, len(full))
    with caplog.at_level(logging.WARNING, logger=tok.__name__):
        tokens, mask = short.tokenize(prompt)
    assert tokens.tolist() == full and mask.all()
    assert not caplog.records


def test_reject_overflow_names_the_field_and_the_limit(
    model_path: Path, tokenizer: PromptTokenizer
):
    strict = PromptTokenizer.from_file(model_path, MAX_LEN, reject_overflow=True)
    prompt = _long_prompt(tokenizer, 60)
    with pytest.raises(ValidationError) as info:
        strict.tokenize(prompt)
    assert info.value.field == "prompt"
    assert f"at most {MAX_LEN} tokens" in str(info.value)
    # A prompt that fits is tokenized as usual.
    assert np.array_equal(
        strict.tokenize("turn on the stove")[0], tokenizer.tokenize("turn on the stove")[0]
    )


def test_prompt_size_and_type_are_bounded(model_path: Path):
    small = PromptTokenizer.from_file(model_path, MAX_LEN, max_prompt_chars=10)
    with pytest.raises(ValidationError, match="prompt: expected at most 10 characters"):
        small.tokenize("x" * 11)
    with pytest.raises(ValidationError, match="prompt: expected a string"):
        small.tokenize(b"turn on the stove")  # type: ignore[arg-type]


def test_loading_errors_are_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path
):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        PromptTokenizer.from_file(garbage, MAX_LEN)
    with pytest.raises(FileNotFoundError):
        PromptTokenizer.from_file(tmp_path / "missing.model", MAX_LEN)
    monkeypatch.setattr(tok, "MAX_MODEL_BYTES", 100)
    with pytest.raises(ValueError, match="expected at most 100 bytes"):
        PromptTokenizer.from_file(model_path, MAX_LEN)
    with pytest.raises(ValueError, match="max_len"):
        PromptTokenizer(model_path.read_bytes(), 1)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path, vocab_size=100)


def test_file_url_loads_through_the_download_cache(model_path: Path, tokenizer: PromptTokenizer):
    from_url = PromptTokenizer.from_file(model_path.as_uri(), MAX_LEN)
    assert np.array_equal(
        from_url.tokenize("turn on the stove")[0], tokenizer.tokenize("turn on the stove")[0]
    )
    assert from_url.vocab_size == 512 and from_url.bos_id == 2
