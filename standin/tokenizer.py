"""Prompt tokenizers for the umT5 text encoder.

Both tokenizers turn a batch of prompts into fixed-length ids and a padding mask, the way Wan2.1
feeds umT5: clean the text, tokenize, cut to `text_len - 1` tokens, append EOS, pad to `text_len`.

- `HFTokenizer` reads the official `google/umt5-xxl/tokenizer.json` with the `tokenizers`
  package (no `transformers`).
- `ByteTokenizer` is self-contained (UTF-8 bytes) for the `tiny` preset and tests.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import ftfy
import torch

from standin.checkpoints import check_file
from standin.errors import CheckpointError

log = logging.getLogger(__name__)


UMT5_TOKENIZER_FILE = "tokenizer.json"

# Unicode White_Space, i.e. what `\s` matches in the `regex` module Wan uses. Python's `re`
# `\s` also matches U+001C..U+001F, so the class is spelled out to collapse exactly the same runs.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'` text cleaning.

    `ftfy.fix_text` first, as Wan does (repairs mojibake, straightens curly quotes, normalizes
    character widths), then HTML entities are unescaped twice, runs of whitespace collapse to one
    space, and the ends are stripped.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


class PromptTokenizer(Protocol):
    """Turns prompts into `(ids [B, text_len] int64, mask [B, text_len] int64)`.

    `mask` is 1 on the prompt's tokens (EOS included), 0 on padding, always a prefix.
    """

    text_len: int
    vocab_size: int

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def pack_token_ids(
    token_ids: Sequence[Sequence[int]], text_len: int, *, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each sequence to `text_len - 1`, append EOS, right-pad to `text_len`.

    Returns ids [B, text_len] and mask [B, text_len] (int64); the same result as the Hugging
    Face call Wan makes (`padding="max_length", truncation=True, add_special_tokens=True`).
    """
    if text_len < 1:
        raise ValueError(f"text_len must be at least 1, got {text_len}")
    ids = torch.full((len(token_ids), text_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), text_len), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        kept = [*seq[: text_len - 1], eos_id]
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        mask[row, : len(kept)] = 1
    return ids, mask


def _as_list(prompts: Sequence[str] | str) -> list[str]:
    # a bare string is one prompt, not a batch of characters
    return [prompts] if isinstance(prompts, str) else list(prompts)


class ByteTokenizer:
    """Deterministic byte-level tokenizer: id = UTF-8 byte + 2; 0 is padding, 1 is EOS."""

    pad_id = 0
    eos_id = 1
    byte_offset = 2
    vocab_size = 256 + byte_offset

    def __init__(self, text_len: int = 512) -> None:
        self.text_len = text_len

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B of them) → ids [B, text_len], mask [B, text_len]."""
        seqs = [[b + self.byte_offset for b in clean_prompt(p).encode("utf-8")] for p in _as_list(prompts)]
        return pack_token_ids(seqs, self.text_len, eos_id=self.eos_id, pad_id=self.pad_id)

    def decode(self, ids: torch.Tensor) -> str:
        """ids [L] → text, up to the first EOS (padding and EOS dropped)."""
        out = bytearray()
        for i in ids.tolist():
            if i == self.eos_id:
                break
            if i >= self.byte_offset:
                out.append(i - self.byte_offset)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """The umT5 SentencePiece tokenizer from a `tokenizer.json` (e.g. `<ckpt>/google/umt5-xxl`).

    Matches Wan's `HuggingfaceTokenizer(seq_len=512, clean="whitespace")`: EOS (`</s>`) is
    appended after the prompt's tokens, padding uses `<pad>`, truncation keeps the first
    `text_len - 1` tokens. Prompts are cleaned by `clean_prompt`.
    """

    def __init__(self, tokenizer_dir: Path, text_len: int = 512) -> None:
        from tokenizers import Tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"missing tokenizer directory: {tokenizer_dir}")
        path = tokenizer_dir / UMT5_TOKENIZER_FILE
        check_file(path, "tokenizer file")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read tokenizer {path}: {e}") from e
        # padding, truncation and EOS are done by pack_token_ids, whatever the file says
        tok.no_padding()
        tok.no_truncation()
        ids = {}
        for token in ("</s>", "<pad>"):
            i = tok.token_to_id(token)
            if i is None:
                raise CheckpointError(f"tokenizer {path} has no {token} token")
            ids[token] = i
        self._tok = tok
        self.path = path
        self.text_len = text_len
        self.eos_id = ids["</s>"]
        self.pad_id = ids["<pad>"]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        log.info("loaded tokenizer %s (vocab %d)", path, self.vocab_size)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B of them) → ids [B, text_len], mask [B, text_len]."""
        cleaned = [clean_prompt(p) for p in _as_list(prompts)]
        encodings = self._tok.encode_batch(cleaned, add_special_tokens=False)
        return pack_token_ids(
            [e.ids for e in encodings], self.text_len, eos_id=self.eos_id, pad_id=self.pad_id
        )
