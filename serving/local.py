"""The local engine: a transformers causal LM on CPU or GPU with continuous batching.

One scheduler thread owns the model. Each iteration it applies weight swaps, admits queued
requests, prefills one chunk (``prefill_chunk`` tokens) of one admitted sequence in its own
KV cache (shortest remaining first; a finished prompt joins the running batch, see
`serving.batch`; a score request is a prefill of prompt + continuation that keeps the logits
of the continuation positions), and decodes every running sequence one token in one forward
pass per policy. A long prompt or score thus delays the running batch one chunk per step,
never its whole prefill. Callers on any asyncio loop talk to it through thread-safe queues, so the
event loop never blocks on torch and no request waits behind another one's whole generation.
Admission is bounded by ``max_batch_size`` running sequences; the rest queue, none is refused.

Logprobs are the raw model logprob at temperature 1 of each sampled token (see
`serving.sampling`). A request whose params carry a grammar samples only what the grammar
allows next (serving.grammar; compiled off the scheduler thread, cached by its text). Every
sampled token is returned, including EOS and the token that completed a stop string: the
gateway trims the text, the learner trains on what was sampled.

Weight swaps (`load_weights`) never refuse or fail a request. A request is pinned to the
`Policy` (weights + version) that was current when it was admitted, and decodes in that
policy's own batch until it ends. FULL: the new model is loaded off to the side in a worker
thread, then the scheduler switches `current` between two steps; the old model's batch keeps
stepping until its last request ends, then the old model is dropped. LORA: adapters sit on
the base model through peft; the adapter files are read off to the side, injected between
steps under a fresh adapter name, and each policy's batch runs with its own adapter active;
a superseded adapter is deleted when its last request ends. `score(base=True)` uses the base
weights: adapters disabled, or the base model copy kept after a FULL swap when ``keep_base``
(one more model in memory; without it base scoring raises after a FULL swap).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from infra import heap
from infra.errors import ContextLengthError, ServingError
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import EngineInfo, Generation, Scores, TokenDelta, WeightsKind, register_engine
from serving.localmodel import Policy, Weights, load_adapter_files, load_hf_model, max_context
from serving.prefix import PrefixCache

log = logging.getLogger(__name__)

_END = object()


class _Request:
    """One caller's request as the scheduler sees it; results flow back to the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int],
                 params: SamplingParams | None = None) -> None:
        self.loop = loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.prompt_ids = prompt_ids
        self.tokens = prompt_ids   # what is prefilled: the prompt, or prompt + continuation to score
        self.params = params
        self.cancelled = False
        self.policy: Policy | None = None
        self.generated: list[int] = []
        self.generator = None
        self.score: tuple[list[int], int, bool] | None = None  # (continuation, top_k, base)
        self.scored: tuple[list, list, list] = ([], [], [])      # logprobs, top ids, top logprobs
        self.cache: Any = None      # its own KV cache while it is being prefilled
        self.prefilled = 0          # prompt tokens prefilled so far
        self.constraint: Any = None  # serving.grammar.Constraint when params carry a grammar
        self.grammar_error: ServingError | None = None

    def mask(self) -> Any:
        return self._masked if self.constraint is not None else None

    def _masked(self, logits: Any) -> Any:
        """The grammar's mask on this row; a failure fails this request alone (at its token)."""
        try:
            return self.constraint.mask(logits)
        except Exception as exc:  # noqa: BLE001 - xgrammar/kernel errors: this request only
            self.grammar_error = ServingError(f"the grammar's mask failed: {exc}")
            return logits

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone: nobody is listening any more
            self.cancelled = True


@register_engine("local")
class LocalEngine:
    """Transformers engine; see the module docstring for batching and swap semantics."""

    name = "local"

    def __init__(self, settings: ServingSettings, model_dir: str | Path | None = None,
                 initial_version: int = 0) -> None:
        import torch

        from serving.models import resolve_model

        self.settings = settings
        self.model_dir = Path(model_dir) if model_dir else resolve_model(settings.model, settings.cache_dir)
        self.device = torch.device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.cpu_threads)  # process-wide; see ServingSettings
        self.dtype = getattr(torch, settings.dtype)
        self.tokenizer, model = load_hf_model(self.model_dir, self.device, self.dtype)
        self.max_context = max_context(model.config)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self._base: Weights | None = Weights(model)
        self._vocab = model.config.vocab_size
        self._current = Policy(initial_version, self._base, None, WeightsKind.FULL)
        self._base_policy: Policy | None = self._current
        self._adapter_seq = itertools.count(1)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._pending: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._batches: dict[int, tuple[Policy, Any]] = {}  # id(policy) -> (policy, Batch)
        self._stats = {"steps": 0, "tokens": 0, "swaps": 0, "relabels": 0}
        self._dropped: weakref.ref | None = None   # the base model, weakly, once dropped
        self._prefix = (PrefixCache(settings.prefix_cache_mb << 20, settings.prefix_cache_min_tokens)
                        if settings.prefix_cache_mb > 0 else None)
        self._grammars: Any = None   # serving.grammar.Grammars, made on the first grammar
        self._grammars_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="local-engine", daemon=True)
        self._thread.start()

    # -- public API (any asyncio loop) ---------------------------------------------------

    def info(self) -> EngineInfo:
        cur = self._current
        return EngineInfo(
            name=self.name, model=str(self.model_dir), policy_version=cur.version,
            max_context=self.max_context,
            details={"tokenizer": str(self.model_dir), "device": str(self.device),
                     "dtype": self.settings.dtype, "weights": cur.kind.value,
                     "adapter": cur.adapter, "running": self._running(),
                     "queued": len(self._pending), **self._stats,
                     "prefix_cache": self._prefix_stats()},
        )

    def _prefix_stats(self) -> dict[str, int] | None:
        if self._prefix is None:
            return None
        return {**self._prefix.stats, "entries": len(self._prefix.entries), "bytes": self._prefix.nbytes}

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        ids, logprobs, finish, version = [], [], "length", self._current.version
        async for delta in self.stream(prompt_ids, params):
            ids.append(delta.token_id)
            logprobs.append(delta.logprob)
            version = delta.policy_version
            finish = delta.finish_reason or finish
        return Generation(ids, logprobs, finish, version, len(prompt_ids))

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        self._check_context(len(prompt_ids), params.max_new_tokens)
        if not prompt_ids:
            raise ServingError("cannot generate from an empty prompt")
        if params.max_new_tokens <= 0:
            return
        req = _Request(asyncio.get_running_loop(), list(prompt_ids), params)
        if params.grammar:
            req.constraint = await asyncio.to_thread(self._constraint, params.grammar)
        self._submit(req)
        try:
            while True:
                item = await req.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancelled = True  # consumer stopped early (disconnect): free the slot
            self._wake.set()

    async def score(self, prompt_ids: list[int], continuation_ids: list[int],
                    top_k: int = 0, base: bool = False) -> Scores:
        if not prompt_ids:
            raise ServingError("score needs at least one prompt token (the first continuation "
                               "token is predicted from it)")
        self._check_context(len(prompt_ids) + len(continuation_ids), 0)
        if not continuation_ids:
            return Scores([], [] if top_k else None, [] if top_k else None, self._current.version)
        req = _Request(asyncio.get_running_loop(), list(prompt_ids))
        req.score = (list(continuation_ids), top_k, base)
        req.tokens = req.prompt_ids + req.score[0]
        self._submit(req)
        try:
            item = await req.out.get()
        finally:
            req.cancelled = True  # a caller that gave up frees the slot
        if isinstance(item, BaseException):
            raise item
        return item

    async def load_weights(self, path: str, kind: WeightsKind, version: int) -> None:
        path = Path(path)
        t0 = time.perf_counter()
        if WeightsKind(kind) is WeightsKind.FULL:
            _, model = await asyncio.to_thread(load_hf_model, path, self.device, self.dtype, False)
            if model.config.vocab_size != self._vocab:
                raise ServingError(f"checkpoint {path} has vocab {model.config.vocab_size}, the "
                                   f"served model {self._vocab}")
            policy = Policy(version, Weights(model), None, WeightsKind.FULL)
            await self._command(lambda: self._install(policy))
        else:
            config, tensors = await asyncio.to_thread(load_adapter_files, path, self.device)
            name = f"v{version}-{next(self._adapter_seq)}"
            await self._command(lambda: self._install_lora(config, tensors, name, version))
        log.info("now serving %s v%d from %s (%.2fs)", kind, version, path, time.perf_counter() - t0)

    async def relabel(self, version: int) -> bool:
        """The current policy becomes `version` in place: requests keep their prefix cache
        entries (they belong to the policy object, not to its number) and in-flight requests
        report the new number for the tokens still to come (the weights are the same)."""
        def run() -> bool:
            cur = self._current
            if version <= cur.version or cur is self._base_policy:
                return False   # never renumber the start-up weights: base scoring reports them
            old, cur.version = cur.version, version
            self._stats["relabels"] += 1
            log.info("serving v%d's weights as v%d (the same files; nothing loaded)", old, version)
            return True

        return await self._command(run)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)

    # -- plumbing between loops and the scheduler thread ---------------------------------

    def _constraint(self, grammar: str) -> Any:
        """A matcher for `grammar` (compiled once per text); off the scheduler thread."""
        from serving.grammar import GrammarError, Grammars

        with self._grammars_lock:
            if self._grammars is None:
                try:
                    self._grammars = Grammars(self.tokenizer, self._vocab, self.eos_ids)
                except Exception as exc:  # noqa: BLE001 - the tokenizer xgrammar cannot read
                    raise GrammarError(f"constrained decoding is unavailable for this tokenizer: {exc}") from None
        return self._grammars.constraint(self._grammars.compile(grammar))

    def _check_context(self, prompt_tokens: int, max_new: int) -> None:
        if prompt_tokens + max_new > self.max_context:
            raise ContextLengthError(prompt_tokens, max_new, self.max_context)

    def _submit(self, req: _Request) -> None:
        if self._closed:
            raise ServingError("local engine is closed")
        self._inbox.put(req)
        self._wake.set()

    async def _command(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # hand the failure to the caller, keep serving
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        self._inbox.put(run)
        self._wake.set()
        return await fut

    # -- the scheduler thread -----------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._closed:
                if self._dropped is not None:
                    self._collect_dropped()
                try:
                    self._drain_inbox()
                    busy = self._admit() | self._prefill_step() | self._decode_all()
                except Exception as exc:  # a bug must fail requests, never kill the thread
                    log.exception("scheduler step failed")
                    self._fail_running(ServingError(f"local engine step failed: {exc!r}"))
                    continue
                if not busy and not self._pending:
                    self._wake.wait(0.5)
                    self._wake.clear()
        err = ServingError("local engine closed")
        for req in list(self._pending) + self._prefilling + [s for _, b in self._batches.values() for s in b.seqs]:
            req.emit(err)

    def _fail_running(self, err: ServingError) -> None:
        for req in self._prefilling:
            req.emit(err)
            self._release(req)
        self._prefilling.clear()
        for _, batch in self._batches.values():
            for req in batch.seqs:
                req.emit(err)
                self._release(req)
        self._batches.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if callable(item):
                item()
            else:
                self._pending.append(item)

    def _running(self) -> int:
        return sum(len(b) for _, b in self._batches.values()) + len(self._prefilling)

    def _admit(self) -> bool:
        """Move queued requests into prefill while there is room; pin each to the current policy."""
        import torch
        from transformers import DynamicCache

        admitted = False
        while self._pending and self._running() < self.settings.max_batch_size:
            req = self._pending.popleft()
            if req.cancelled:
                continue
            base = req.score is not None and req.score[2]
            if base and self._base_policy is None:
                req.emit(ServingError("score(base=True) after a FULL swap needs keep_base=true"))
                continue
            req.policy = self._base_policy if base else self._current
            req.policy.active += 1
            req.cache, req.prefilled = DynamicCache(), 0
            if self._prefix is not None:
                # a generation prefills at least its last prompt token; a score everything from
                # the position that predicts its first continuation token
                limit = len(req.tokens) - 1 if req.score is None else len(req.prompt_ids) - 1
                cache, n = self._prefix.lookup(req.policy, req.tokens, limit)
                if cache is not None:
                    req.cache, req.prefilled = cache, n
            self._prefilling.append(req)
            admitted = True
            if req.score is not None:
                req.scored = ([], [], [])
                continue
            if req.params.seed is not None:
                req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        return admitted

    def _prefill_step(self) -> bool:
        """Prefill one chunk of one prompt (shortest remaining first), so a long prompt delays
        the running batch by one chunk per step instead of its whole prefill."""
        from serving.batch import Batch
        from serving.sampling import sample_rows

        for req in [r for r in self._prefilling if r.cancelled]:
            self._prefilling.remove(req)
            self._release(req)
        if not self._prefilling:
            return False
        req = min(self._prefilling, key=lambda r: len(r.tokens) - r.prefilled)
        policy, start = req.policy, req.prefilled
        end = min(start + self.settings.prefill_chunk, len(req.tokens))
        # A score needs the logits that predict each continuation token (positions P-1..N-2);
        # a generation only the last one.
        keep = 1 if req.score is None else max(1, end - max(len(req.prompt_ids) - 1, start))
        try:
            ids = torch_ids(req.tokens[start:end], self.device)
            with policy.activated():
                out = policy.weights.forward(input_ids=ids, past_key_values=req.cache, use_cache=True,
                                             logits_to_keep=keep)
            req.cache, req.prefilled = out.past_key_values, end
            if req.score is not None:
                self._score_chunk(req, out.logits[0], end)
                return True
            if req.prefilled < len(req.tokens):
                return True
            params = req.params
            tok, lp = sample_rows(out.logits[:, -1, :], [params.temperature], [params.top_p], [req.generator],
                                  [req.mask()], [params.top_k])
        except Exception as exc:
            log.exception("prefill failed")
            self._prefilling.remove(req)
            req.emit(ServingError(f"prefill of a {len(req.tokens)}-token sequence failed: {exc}"))
            self._release(req)
            return True
        self._prefilling.remove(req)
        cache, req.cache = req.cache, None
        if self._prefix is not None:
            try:
                self._prefix.store(policy, req.tokens, cache)
            except Exception:  # noqa: BLE001 - a cache that cannot keep an entry serves on
                log.exception("prefix cache: could not keep a %d-token prompt", len(req.tokens))
        if self._emit_token(req, tok[0], lp[0]):
            self._release(req)
            return True
        batch = self._batches.setdefault(id(policy), (policy, Batch()))[1]
        batch.join(req, cache, len(req.prompt_ids), tok[0])
        return True

    def _decode_all(self) -> bool:
        from serving.sampling import sample_rows

        stepped = False
        for key, (policy, batch) in list(self._batches.items()):
            self._drop_cancelled(batch)
            if not len(batch):
                del self._batches[key]
                continue
            try:
                with policy.activated():
                    out = policy.weights.forward(**batch.step_inputs(), logits_to_keep=1)
            except Exception as exc:
                log.exception("decode step failed")
                for req in batch.seqs:
                    req.emit(ServingError(f"decode step failed: {exc}"))
                    self._release(req)
                del self._batches[key]
                continue
            batch.cache = out.past_key_values
            seqs = batch.seqs
            ids, lps = sample_rows(out.logits[:, -1, :], [r.params.temperature for r in seqs],
                                   [r.params.top_p for r in seqs], [r.generator for r in seqs],
                                   [r.mask() for r in seqs], [r.params.top_k for r in seqs])
            keep = []
            for i, (req, tok, lp) in enumerate(zip(seqs, ids, lps, strict=True)):
                if self._emit_token(req, tok, lp):
                    self._release(req)
                else:
                    keep.append(i)
            batch.advance(ids)
            batch.keep(keep)
            self._stats["steps"] += 1
            stepped = True
        return stepped

    def _drop_cancelled(self, batch) -> None:
        gone = [i for i, r in enumerate(batch.seqs) if r.cancelled]
        if gone:
            for i in gone:
                self._release(batch.seqs[i])
            batch.keep([i for i in range(len(batch.seqs)) if i not in gone])

    def _emit_token(self, req: _Request, tok: int, lp: float) -> bool:
        """Send one sampled token to the caller; True if the sequence is now finished."""
        from serving.sampling import hits_stop, stop_window

        req.generated.append(tok)
        self._stats["tokens"] += 1
        params = req.params
        if req.constraint is not None:
            try:
                if req.grammar_error is not None:
                    raise req.grammar_error
                req.constraint.accept(tok)
            except ServingError as exc:   # never expected (the mask allowed it): this request only
                req.emit(exc)
                return True
        finish = None
        if tok in self.eos_ids:
            finish = "stop"
        elif params.stop and hits_stop(
                self.tokenizer.decode(req.generated[-stop_window(params.stop):]), params.stop):
            finish = "stop"
        elif len(req.generated) >= params.max_new_tokens:
            finish = "length"
        req.emit(TokenDelta(tok, lp, finish, req.policy.version))
        return finish is not None or req.cancelled

    def _release(self, req: _Request) -> None:
        policy, req.policy = req.policy, None
        if policy is None:
            return
        policy.active -= 1
        if policy.active == 0 and policy is not self._current and policy is not self._base_policy:
            self._retire(policy)
        self._maybe_drop_base()

    def _maybe_drop_base(self) -> None:
        """Without keep_base, forget the base weights once a FULL swap replaced them and no
        request or adapter still runs on them (frees one model's memory)."""
        base = self._base_policy
        if (base is None or self.settings.keep_base or self._current.weights is self._base
                or base.active or self._base.adapters):
            return
        self._dropped = weakref.ref(self._base.model)
        self._base_policy, self._base = None, None
        if self._prefix is not None:   # its entries hold the base model: let it go
            self._prefix.keep_only([self._current])
        log.info("dropped the base weights (keep_base=false)")

    def _collect_dropped(self) -> None:
        """The start-up model may sit in the collector's frozen generation (infra.heap), where
        reference cycles in it would never be collected. Once nothing here holds it (an empty
        batch keeps it until the next decode pass), let one collection see it, unless reference
        counting already freed it."""
        model = self._dropped()
        if model is not None and any(p.weights.model is model for p, _ in self._batches.values()):
            return
        self._dropped = None
        if model is not None:
            del model
            heap.refreeze()

    def _retire(self, policy: Policy) -> None:
        """The last request on a superseded policy ended: free its adapter or model."""
        if self._prefix is not None:
            self._prefix.keep_only([p for p in (self._current, self._base_policy) if p is not None])
        if policy.adapter is not None:
            policy.weights.delete_adapter(policy.adapter)
        log.info("retired policy v%d (%s)", policy.version, policy.adapter or policy.kind.value)

    def _install(self, policy: Policy) -> None:
        old, self._current = self._current, policy
        self._stats["swaps"] += 1
        if self._prefix is not None:   # new requests pin to the new policy: old KV is of no use
            self._prefix.keep_only([p for p in (self._current, self._base_policy) if p is not None])
        if old.active == 0 and old is not self._base_policy:
            self._retire(old)
        self._maybe_drop_base()

    def _install_lora(self, config: Any, tensors: dict, name: str, version: int) -> None:
        if self._base is None:
            raise ServingError(f"cannot apply LoRA v{version}: the base weights were dropped after "
                               "a FULL swap (set NEXTSTATE_SERVING__KEEP_BASE=true)")
        self._base.add_adapter(name, config, tensors)
        self._install(Policy(version, self._base, name, WeightsKind.LORA))

    def _score_chunk(self, req: _Request, logits: Any, end: int) -> None:
        """Collect the continuation logprobs in this chunk's logits; answer when all are in."""
        from serving.sampling import continuation_logprobs

        continuation, top_k, _ = req.score
        first = max(len(req.prompt_ids) - 1, end - logits.shape[0])  # position of logits row 0
        last = min(end, len(req.tokens) - 1)                          # positions first..last-1
        if last > first:
            rows = logits[first - (end - logits.shape[0]):last - (end - logits.shape[0])]
            targets = req.tokens[first + 1:last + 1]
            for acc, part in zip(req.scored, continuation_logprobs(rows, targets, top_k), strict=True):
                acc.extend(part)
        if end < len(req.tokens):
            return
        self._prefilling.remove(req)
        req.cache = None
        lps, top_ids, top_lps = req.scored
        req.emit(Scores(lps, top_ids if top_k else None, top_lps if top_k else None, req.policy.version))
        self._release(req)


def torch_ids(ids: list[int], device: Any):
    import torch

    return torch.tensor([ids], dtype=torch.long, device=device)


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, list | tuple) else [value])
    return ids
