"""Sampled token ids -> the text a client may see, one token at a time.

`TextAssembler` turns the engine's token stream into safe text deltas: it holds back a
trailing incomplete UTF-8 sequence, a trailing prefix of a stop string or of a tool-call
marker, and everything from the start of a tool call on (parsed into `tool_calls` at the
end). A completed stop string ends the turn; the client never sees it.

It only decides what text to show. The recorded response token ids are every id the engine
sampled, untouched, including those that completed a stop string. Knows no HTTP or engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from producers.gateway.chat import ParsedOutput, ToolCallParser

_INCOMPLETE = "\ufffd"  # what a decoder shows for a partial multi-byte character


@dataclass(frozen=True)
class Final:
    delta: str                 # content not yet emitted
    parsed: ParsedOutput       # the whole visible answer: content and tool calls
    raw_text: str              # decode of every sampled id (what the turn records)
    stopped_by: str | None     # the stop string that ended the turn, if one did


class TextAssembler:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None,
                 parser: ToolCallParser | None = None) -> None:
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._parser = parser
        self._holds = tuple(self._stop) + (parser.markers() if parser else ())
        self.ids: list[int] = []
        self._text = ""        # visible text so far (cut at a stop string)
        self._emitted = 0      # chars of _text already handed out as content
        self._tool_at: int | None = None
        self.stopped_by: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def push(self, token_id: int) -> str:
        """Add one sampled id; the content that is now safe to show (maybe empty)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith(_INCOMPLETE):
            return ""
        for s in self._stop:
            i = text.find(s, max(0, len(self._text) - len(s)))
            if i >= 0:
                text, self.stopped_by = text[:i], s
                break
        self._text = text
        return self._advance(final=self.stopped)

    def push_many(self, token_ids: list[int]) -> str:
        """Add a whole sampled answer at once (no stop strings: those need `push`)."""
        self.ids.extend(token_ids)
        self._text = self._tok.decode(self.ids, skip_special_tokens=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._text
        if self._parser is not None and self._tool_at is None:
            self._tool_at = self._parser.start(text)
        end = len(text) if self._tool_at is None else self._tool_at
        if not final:
            end = min(end, self._safe_end(text))
        if end <= self._emitted:
            return ""
        delta, self._emitted = text[self._emitted:end], end
        return delta

    def _safe_end(self, text: str) -> int:
        # Hold back a tail that could still grow into a stop string or a tool-call marker.
        end = len(text)
        for marker in self._holds:
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    end = min(end, len(text) - k)
                    break
        return end

    def finish(self) -> Final:
        """Everything not yet shown, and the answer parsed into content and tool calls."""
        raw = self._tok.decode(self.ids, skip_special_tokens=True)
        if not self.stopped:
            # The answer is over: a partial character will never complete, show it as U+FFFD.
            self._text = raw
        if self._tool_at is None and self._parser is not None:
            self._tool_at = self._parser.start(self._text)
        if self._tool_at is not None:
            parsed = self._parser.parse(self._text)
        else:
            parsed = ParsedOutput(self._text or None, [])
        content = parsed.content or ""
        shown = self._text[:self._emitted]
        # Content already streamed stays; only what follows it is still to send.
        delta = content[len(shown):] if content.startswith(shown) else ""
        self._emitted = len(self._text)
        return Final(delta, parsed, raw, self.stopped_by)
