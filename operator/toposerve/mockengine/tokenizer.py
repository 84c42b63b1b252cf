"""A deterministic, download-free tokenizer and text generator for the mock engine.

Routers and autoscalers only care that token counts are stable and roughly word-sized, and that
the same text always maps to the same ids (prefix caching hashes ids, so a shared prompt prefix
must give a shared id prefix). A real BPE vocabulary would need a download, so: one token per
word or punctuation mark, leading whitespace attached, ids from a stable hash.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence

VOCAB_SIZE = 32000
# Pieces remembered for decode: at most one per id (VOCAB_SIZE), and only short ones, so a
# client sending one megabyte-long "word" does not leave it in memory for good.
_MAX_PIECE_CHARS = 64
# Leading whitespace belongs to the next token (like GPT-style BPE), so text round-trips exactly.
_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

# Words the generator emits; fixed so that output text is identical across processes and versions.
_WORDS: tuple[str, ...] = tuple(
    " ".join(
        (
            "the of and to in is that for it as with was on be by this are from at or an have not which",
            "but all they were one their there has been more can will when would who about if out so what",
            "them up into some time than only other its two then also these could may first any new like",
            "model token cache batch kernel tensor memory latency request stream router replica cluster",
            "node pool prefix decode prefill block queue engine serving throughput bandwidth scale",
        )
    ).split(" ")
)


def _stable_id(piece: str) -> int:
    # surrogatepass: never raise on text the HTTP layer let through (the server rejects lone
    # surrogates with a 400 before this; the tokenizer itself stays total)
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % VOCAB_SIZE


class MockTokenizer:
    """Word-level tokenizer with stable ids; remembers pieces so ids detokenize back to text."""

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        self._piece_ids: dict[str, int] = {}

    def pieces(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(text)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`; with `limit`, stops after limit + 1 tokens.

        The bound is what keeps a 20 MB prompt from stalling the event loop for seconds: the
        caller only needs to know that the prompt is over the context limit, not by how much.
        """
        ids = []
        pieces = self._pieces
        for m in _TOKEN_RE.finditer(text):
            piece = m.group()
            tid = _stable_id(piece)
            if len(piece) <= _MAX_PIECE_CHARS:
                pieces.setdefault(tid, piece)
            ids.append(tid)
            if limit is not None and len(ids) > limit:
                break
        return ids

    def piece_id(self, piece: str) -> int:
        """Id of a single-token piece, memoised: the generator emits from a small fixed set."""
        tid = self._piece_ids.get(piece)
        if tid is None:
            tid = self._piece_ids[piece] = self.encode(piece)[0]
        return tid

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces.get(i, f"<{i}>") for i in ids)

    def count(self, text: str) -> int:
        return len(self.pieces(text))


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """A fixed chat template, so the same conversation prefix always gives the same token prefix."""
    parts: list[str] = []
    for m in messages:
        role = str(m.get("role", "user"))
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
            )
        parts.append(f"<|{role}|>\n{content if content is not None else ''}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class TextGenerator:
    """Seeded, deterministic output: the same (seed, prompt) always yields the same completion."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rng_for(self, prompt_ids: Sequence[int], request_seed: int | None = None) -> random.Random:
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.seed if request_seed is None else request_seed).encode())
        h.update(b"|")
        h.update(",".join(map(str, prompt_ids[-64:])).encode())
        return random.Random(int.from_bytes(h.digest(), "little"))

    @staticmethod
    def natural_length(rng: random.Random, lo: int, hi: int) -> int:
        """Where the 'model' would emit EOS when the client set no max_tokens."""
        return rng.randint(lo, max(lo, hi))

    @staticmethod
    def next_piece(rng: random.Random, index: int) -> str:
        word = _WORDS[rng.randrange(len(_WORDS))]
        if index == 0:
            return word.capitalize()
        # Every piece is exactly one token of MockTokenizer, so echoed output re-counts the same.
        return "." if rng.random() < 0.08 else " " + word
