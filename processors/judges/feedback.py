"""The `feedback` judges: rewards and hints from explicit signals and rules, no LLM.

Rule table (first row that fires decides; later rows are not consulted):

| # | rule        | reads                                            | score                 |
|---|-------------|--------------------------------------------------|-----------------------|
| 1 | thumbs      | the last THUMBS feedback's ``thumbs``             | sign: >0 → +1, <0 → -1 |
| 2 | outcome     | the last OUTCOME_REWARD feedback's ``reward``      | sign (0 → 0)          |
| 3 | test        | the last TEST_RESULT feedback's ``passed``         | true → +1, false → -1 |
| 4 | exit code   | every TOOL/TERMINAL_OUTPUT with an ``exit_code`` (a step may run several) | any non-zero → -1; all 0 with output → +1; all 0, nothing printed → 0 |
| 5 | correction  | the user's text in the next state (messages with role user and USER_MESSAGE feedback) matches a correction pattern | -1 |
| 6 | approval    | the same text matches an approval pattern         | +1                    |
| 7 | none        | nothing above fired                               | 0                     |

Corrections are checked before approvals ("thanks, but that's wrong" is a correction).
The patterns are case-insensitive regexes, overridable through
``ProcessorSettings.correction_patterns`` / ``approval_patterns``. Tool output is never
matched against the text rules: only people correct the assistant.

The hint judge reuses the correction rule: when the user's text corrects the assistant, that
text itself (trimmed) is the hint, vote +1; otherwise vote -1 and no hint.

Text is matched, never obeyed: a next state saying "output \\boxed{1}" is just text here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from infra.settings import ProcessorSettings
from processors.judges.prompts import JudgePrompt, next_state_text
from schemas.events import FeedbackKind, HintVote, JudgeVote, TransitionFormed

# People correct an assistant in a few recurring ways; each group below is one of them.
CORRECTION_PATTERNS = [
    # outright rejection
    r"^\s*no\b", r"\bno,", r"\bnope\b", r"that'?s (wrong|not (right|it|what))", r"\bwrong\b",
    r"\bincorrect\b", r"not what i (asked|meant|wanted)", r"\btry again\b", r"\bredo\b",
    # repeating or restating an instruction
    r"\bi said\b", r"\binstead\b", r"\bshould (have|be)\b", r"\bnext time\b", r"\bfrom now on\b",
    r"\b(always|never) (end|use|start|include|add|write|answer|ask|give|put|keep|reply)\b",
    # asking for the opposite of what was done
    r"\bplease don'?t\b", r"\bdon'?t do\b", r"\bstop\b",
    r"\bplease (keep|use|make|be|write|answer|avoid|end|start|add|remove|include|only|just|stick)\b",
    r"\bkeep (it|them|your (answers?|replies|responses))\b",
    # saying what was wrong with it
    r"\btoo (long|short|much|many|wordy|verbose|vague|complicated|technical|formal|casual)\b",
    r"\bfar too\b", r"\byou (forgot|didn'?t|did not|never|missed|ignored)\b",
    # stating a preference the answer did not meet
    r"\bi('d| would) (like|prefer|rather)\b",
    r"\bi (only|don'?t|do not|can'?t|cannot) (use|understand|read|want|like|need)\b",
]
APPROVAL_PATTERNS = [
    r"\bthanks?\b", r"\bthank you\b", r"\bperfect\b", r"\bgreat\b", r"\bexactly\b",
    r"\blooks good\b", r"\blgtm\b", r"\bworks\b", r"\bwell done\b",
]
HINT_MAX_CHARS = 500


@dataclass(frozen=True)
class Rules:
    corrections: tuple[re.Pattern[str], ...]
    approvals: tuple[re.Pattern[str], ...]

    @property
    def version(self) -> str:
        table = json.dumps([[p.pattern for p in self.corrections], [p.pattern for p in self.approvals]])
        return hashlib.sha256(table.encode()).hexdigest()[:12]


def compile_rules(corrections: list[str], approvals: list[str]) -> Rules:
    def comp(patterns: list[str]) -> tuple[re.Pattern[str], ...]:
        out = []
        for p in patterns:
            try:
                out.append(re.compile(p, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"feedback judge pattern {p!r} is not a valid regex: {exc}") from exc
        return tuple(out)

    return Rules(comp(corrections), comp(approvals))


def rules_from_settings(s: ProcessorSettings) -> Rules:
    return compile_rules(s.correction_patterns or CORRECTION_PATTERNS,
                         s.approval_patterns or APPROVAL_PATTERNS)


def user_texts(transition: TransitionFormed) -> list[str]:
    """What people said after the response: user messages, then USER_MESSAGE feedback."""
    texts = []
    for m in json.loads(transition.next_messages_json or "[]"):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content:
                texts.append(str(content))
    texts += [fb.text for fb in transition.feedback
              if fb.kind is FeedbackKind.USER_MESSAGE and fb.text]
    return texts


def _last(transition: TransitionFormed, kinds: set[FeedbackKind], field: str):
    for fb in reversed(transition.feedback):
        if fb.kind in kinds and getattr(fb, field) is not None:
            return getattr(fb, field)
    return None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def decide(transition: TransitionFormed, rules: Rules) -> tuple[int, str]:
    """(score, the rule that fired and what it read)."""
    thumbs = _last(transition, {FeedbackKind.THUMBS}, "thumbs")
    if thumbs is not None and _sign(thumbs):
        return _sign(thumbs), f"thumbs: thumbs={thumbs}"
    reward = _last(transition, {FeedbackKind.OUTCOME_REWARD}, "reward")
    if reward is not None:
        return _sign(reward), f"outcome: reward={reward}"
    passed = _last(transition, {FeedbackKind.TEST_RESULT}, "passed")
    if passed is not None:
        return (1 if passed else -1), f"test: passed={passed}"
    runs = [fb for fb in transition.feedback
            if fb.kind in (FeedbackKind.TOOL_OUTPUT, FeedbackKind.TERMINAL_OUTPUT) and fb.exit_code is not None]
    if runs:
        failed = [fb.exit_code for fb in runs if fb.exit_code != 0]
        if failed:
            return -1, f"exit code: {len(failed)} of {len(runs)} run(s) failed, exit_code={failed[-1]}"
        if any((fb.text or "").strip() for fb in runs):
            return 1, f"exit code: {len(runs)} clean run(s) with output"
        return 0, f"exit code: {len(runs)} clean run(s) that printed nothing"
    for text in reversed(user_texts(transition)):
        for p in rules.corrections:
            if p.search(text):
                return -1, f"correction: /{p.pattern}/ matched {text[:120]!r}"
        for p in rules.approvals:
            if p.search(text):
                return 1, f"approval: /{p.pattern}/ matched {text[:120]!r}"
    return 0, "none: no explicit signal and no rule matched"


def _prompt(transition: TransitionFormed, rules: Rules, what: str) -> JudgePrompt:
    # "Prompt" of a rule judge: the rule table version and the text it read, hashed alike.
    payload = {"judge": what, "rules": rules.version, "next_state": next_state_text(transition)}
    return JudgePrompt([{"role": "data", "content": json.dumps(payload)}],
                       hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())


class _RuleJudge:
    """What the reward and hint rule judges share: the rule table and its prompt record."""

    name = "feedback"
    model = "rules"
    what = ""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.version = rules.version

    def prompt(self, transition: TransitionFormed) -> JudgePrompt:
        return _prompt(transition, self.rules, self.what)


class FeedbackJudge(_RuleJudge):
    what = "reward"

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> JudgeVote:
        score, why = decide(transition, self.rules)
        return JudgeVote(index=index, raw_text=f"{why} -> {score:+d}", score=score)


class FeedbackHintJudge(_RuleJudge):
    what = "hint"

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> HintVote:
        corrections = [t for t in user_texts(transition)
                       if any(p.search(t) for p in self.rules.corrections)]
        if not corrections:
            return HintVote(index=index, raw_text="no correction in the user's text -> -1", score=-1)
        hint = " ".join(t.strip() for t in corrections)[:HINT_MAX_CHARS]
        return HintVote(index=index, raw_text=f"correction -> +1: {hint[:120]!r}", score=1, hint=hint)
