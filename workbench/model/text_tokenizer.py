"""The text tokenizer, trained on the text corpus with Hugging Face ``tokenizers``: whole words
(``model.text_vocab=word``, the default) or byte-pair encoding (``bpe``).

Words by default because the text tasks are tested on held-out phrasings: BPE shatters a word it never
saw ("Zimmer Nummer 3") into character pieces ("z i m m er nu m m er 3") that also occur inside number
words ("ci" of cinque/cinco/cinq, "ro" of zero/quattro), so a new phrasing reads as a jumble of
half-numbers. A word vocabulary maps an unseen word to one ``[UNK]`` ("[UNK] [UNK] 3"), and
``model.text_unk`` teaches the network what ``[UNK]`` means by hiding random training words behind it.

It is part of the model (saved as ``tokenizer.json`` in every checkpoint) because the text
embedding's rows are indexed by its ids. Special ids are fixed: 0 ``[PAD]``, 1 ``[UNK]``,
2 ``[MASK]``, 3 ``[CLS]``. Text longer than ``max_tokens`` is rejected, never silently truncated.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import BpeTrainer, WordLevelTrainer

from workbench.errors import MediaError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[CLS]")
PAD_ID, UNK_ID, MASK_ID, CLS_ID = range(4)
FILENAME = "tokenizer.json"


class TextTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the padding and limits the model expects."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int = 64):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}")

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 2000, max_tokens: int = 64, kind: str = "word"
    ) -> TextTokenizer:
        """Learn a vocabulary from ``texts`` (NFKC, lower case, split on whitespace, punctuation and
        between digits): the ``vocab_size`` most frequent whole words (``kind="word"``, unseen words ->
        ``[UNK]``) or BPE sub-words (``"bpe"``)."""
        if kind == "word":
            tok = Tokenizer(WordLevel(unk_token="[UNK]"))
            trainer = WordLevelTrainer(
                vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
            )
        elif kind == "bpe":
            tok = Tokenizer(BPE(unk_token="[UNK]"))
            trainer = BpeTrainer(
                vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
            )
        else:
            raise ValueError(f"text vocabulary kind must be 'word' or 'bpe', not {kind!r}")
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)]
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok, max_tokens)

    @classmethod
    def for_model(cls, texts: Iterable[str], model_cfg) -> TextTokenizer:
        """The tokenizer ``model_cfg`` (a ``ModelConfig``) asks for, trained on ``texts``."""
        return cls.train(texts, model_cfg.text_vocab_size, model_cfg.max_text_tokens, model_cfg.text_vocab)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings -> ``(ids, lengths)``: int64 (B, N) right-padded with 0, and int64 (B,) valid tokens.

        Raises MediaError for empty text and for text longer than ``max_tokens`` tokens.
        """
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        lengths = [len(r) for r in rows]
        for text, n in zip(texts, lengths):
            if n == 0:
                raise MediaError("the text is empty (or only spaces): type a word or a number")
            if n > self.max_tokens:
                raise MediaError(
                    f"the text is {n} tokens long; the limit is {self.max_tokens} (model.max_text_tokens): "
                    f"shorten it ({text[:40]!r}...)"
                )
        width = max(lengths)
        # padded as lists, then one tensor: a tensor per row made this 6x slower than the tokenizer itself
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows], dtype=torch.long)
        return ids, torch.tensor(lengths, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != PAD_ID])

    def tokens(self, text: str) -> list[str]:
        """The sub-word pieces of ``text`` (for attention pictures)."""
        return self.tokenizer.encode(text).tokens

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / FILENAME))

    @classmethod
    def load(cls, directory: str | Path, max_tokens: int = 64) -> TextTokenizer:
        path = Path(directory) / FILENAME
        if not path.is_file():
            from workbench.errors import CheckpointError

            raise CheckpointError(f"{path} is missing: the checkpoint has no text tokenizer")
        return cls(Tokenizer.from_file(str(path)), max_tokens)
