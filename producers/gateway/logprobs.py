"""OpenAI's `logprobs` for a chat turn: what the engine sampled, token by token, as the client asked.

With `logprobs: true` every choice carries `{"content": [{"token", "logprob", "bytes",
"top_logprobs"}, ...]}`, one entry per token the engine sampled: the same ids and logprobs the
turn records (token-exact; raw model logprobs, before temperature and top-p, see
serving.sampling). Tokens a stop string or a parsed tool call keeps out of the visible text
are listed too, since they were sampled and are trained on.

`top_logprobs: k` adds the k most likely tokens at each position. Engines sample without them,
so they come from one scoring pass over the finished response under the served weights
(`Engine.score`, top-k); the response's `nextstate.top_logprobs_policy_version` says which
version scored them, in case a weight swap landed between sampling and scoring. A stream
cannot wait for that pass, so `top_logprobs` with `stream: true` is refused.

A token's `bytes` are its own bytes where the tokenizer is byte-level (GPT-2 style pieces) or
writes raw bytes as `<0xHH>` (sentencepiece), so a character split across tokens is exact;
elsewhere, the UTF-8 of its decoded text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte 0-255 drawn as one printable character (printable
    Latin-1 bytes as themselves, the rest shifted past 255), inverted."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    drawn, shift = {}, 0
    for b in range(256):
        if b in kept:
            drawn[b] = chr(b)
        else:
            drawn[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in drawn.items()}


class TokenText:
    """Text and bytes of single token ids for one tokenizer, cached by id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            hit = (text, list(self._bytes(token_id, text)))
            if len(self._cache) < 200_000:
                self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece not in self._special:
            raw = _HEX_BYTE.fullmatch(piece)
            if raw:
                return bytes([int(raw.group(1), 16)])
            decoder = _byte_level_decoder()
            if piece and all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
        return text.encode("utf-8")


def entries(text_of: TokenText, ids: list[int], logprobs: list[float],
            top_ids: list[list[int]] | None = None,
            top_logprobs: list[list[float]] | None = None) -> list[dict[str, Any]]:
    """OpenAI `logprobs.content` for the sampled `ids` (and, when given, each position's top-k)."""
    if len(ids) != len(logprobs):
        raise ValueError(f"{len(ids)} tokens but {len(logprobs)} logprobs")
    out = []
    for t, (tid, lp) in enumerate(zip(ids, logprobs)):
        text, raw = text_of(tid)
        top = []
        if top_ids is not None and top_logprobs is not None:
            for alt, alt_lp in zip(top_ids[t], top_logprobs[t]):
                alt_text, alt_raw = text_of(alt)
                top.append({"token": alt_text, "logprob": float(alt_lp), "bytes": alt_raw})
        out.append({"token": text, "logprob": float(lp), "bytes": raw, "top_logprobs": top})
    return out
