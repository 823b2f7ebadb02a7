"""Constrained decoding for the local engine: answers that must match a grammar.

A request's `SamplingParams.grammar` is an EBNF grammar in xgrammar's dialect; the gateway
builds it from `response_format` or a forced `tool_choice` (producers.gateway.constraints),
and the SGLang engine hands the same text to SGLang's own grammar backend. Before each token
is sampled the tokens the grammar does not allow next are masked out of the logits; once the
grammar is complete only the end-of-sequence tokens remain. A grammar that cannot complete
within `max_new_tokens` ends with finish reason "length", like any answer cut off.

The logprob recorded for a token stays the raw model logprob (serving.sampling): the mask
shapes the draw the way temperature and top-p do, and is recorded beside it in the turn's
sampling params; the learner recomputes the same raw quantity under the policy it trains.
"""

from __future__ import annotations

import threading
from typing import Any

from infra.errors import ServingError


class GrammarError(ServingError):
    """A grammar the engine cannot compile."""


class Grammars:
    """Compiles grammars against one tokenizer (cached by text) and makes one matcher per
    request. Built lazily by the engine on the first constrained request: the tokenizer's
    vocabulary is read once here (0.16 s for SmolLM2's 49,152 tokens)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                             cache_limit_bytes=64 << 20)
        self._lock = threading.Lock()   # one compile at a time; the compiler caches by text

    def compile(self, grammar: str) -> Any:
        """The compiled grammar; GrammarError names what the grammar text got wrong."""
        with self._lock:
            try:
                return self._compiler.compile_grammar(grammar)
            except Exception as exc:   # xgrammar raises RuntimeError/ValueError with a position
                raise GrammarError(f"the grammar does not compile: {str(exc).strip()[:500]}") from None

    def constraint(self, compiled: Any) -> "Constraint":
        return Constraint(compiled, self.vocab_size)


class Constraint:
    """One request's place in its grammar: which tokens may come next, and the tokens taken."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def mask(self, logits: Any) -> Any:
        """A copy of one logits row [V] with every token the grammar forbids next at -inf."""
        import xgrammar as xgr

        row = logits.float().clone().unsqueeze(0)
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if row.device.type == "cpu" else self._bitmask.to(row.device)
        xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self._vocab_size)
        return row[0]

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token (one the mask allowed, so it is always accepted)."""
        if not self._matcher.accept_token(token_id):
            raise GrammarError(f"token {token_id} does not continue the grammar")

    @property
    def done(self) -> bool:
        return self._matcher.is_terminated()
