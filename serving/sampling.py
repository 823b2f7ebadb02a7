"""Pure next-token sampling, continuation scoring and stop detection for the local engine
(torch only, no model).

`sample_rows` turns one row of logits per sequence into a sampled token id and that token's
logprob. **The logprob is the raw model logprob at temperature 1**: ``log_softmax(logits)``
of the sampled token, before temperature scaling and top-p truncation. That is the quantity
the learner recomputes under the training policy (which runs at temperature 1 over the full
vocabulary), so behaviour and training logprobs compare like with like; the sampling params
that shaped the draw are recorded beside it in every turn. SGLang's default
``output_token_logprobs`` are the same raw quantity, so both engines agree.

Temperature 0 means greedy; top-k (0: off) and top-p cut the tail before the draw, and a
grammar's mask (serving.grammar) removes what it does not allow; none of them changes the
logprob reported. Each sequence may carry its own ``torch.Generator`` (from its
seed), so a seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of `probs` (1-D) beyond cumulative mass `top_p`; keeps at least one token."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p.
    drop = (cumulative - sorted_probs) >= top_p
    drop[0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample_row(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None, top_k: int = 0) -> int:
    """One token id from a 1-D logits row under temperature, top-k (0: off) and top-p."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[torch.Generator | None],
                masks: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
                top_ks: Sequence[int] | None = None) -> tuple[list[int], list[float]]:
    """Sample one token per row of `logits` [B, V]; return ids and their raw logprobs.
    `masks[i]`, where given, returns row i with the tokens it forbids at -inf (a grammar,
    serving.grammar): the draw is from the masked row, the logprob from the raw one."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = [sample_row(masks[i](logits[i]) if masks and masks[i] else logits[i],
                      temperatures[i], top_ps[i], generators[i], top_ks[i] if top_ks else 0)
           for i in range(logits.shape[0])]
    picked = logprobs[torch.arange(len(ids)), torch.tensor(ids, device=logits.device)]
    return ids, picked.tolist()


def continuation_logprobs(logits: torch.Tensor, targets: Sequence[int], top_k: int = 0
                          ) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Raw logprob of each target under its row of `logits` [T, V], and the top-k per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), device=logprobs.device)[:, None]
    picked = logprobs.gather(1, index)[:, 0].tolist()
    if not top_k:
        return picked, [], []
    values, ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
    return picked, ids.tolist(), values.tolist()


def stop_window(stops: Sequence[str]) -> int:
    """How many trailing tokens to decode to see any stop string whole (bytes-level worst case)."""
    return 4 * max((len(s) for s in stops), default=0) + 4


def hits_stop(tail_text: str, stops: Sequence[str]) -> bool:
    return any(s and s in tail_text for s in stops)
