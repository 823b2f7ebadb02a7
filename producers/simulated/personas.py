"""Simulated users: personas with a hidden preference they reveal only the way people do.

Each persona has a checker that scores a response against its hidden preference. Neither
the policy nor the judge ever sees a checker: the persona reacts to a response in words
(a correction, a re-ask, thanks) and with thumbs, and only that reaction enters the log.
The preferences are compatible with each other, so one policy can satisfy all of them.

Whatever the preference, nobody is satisfied by an answer that loops (infra.repetition.loops:
one sentence said three times or more; such a person says so in words of their own), nor by one
that does not answer (`answers`: it only echoes the question, declines, or talks around it), and
a preference about the whole answer (`whole`: brief) is not met by an answer the token limit cut
off: at that limit it was still going. Token-dense text ("1. 1. 1. …", "T-T-T-…") stays under 40 words
long after the reader has seen that it is no answer.

Pure: no HTTP, no Kafka. `harness.py` makes them talk to a gateway.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from infra.repetition import loops

MARKDOWN = re.compile(r"(\*\*|__|^\s*#{1,6}\s|^\s*[-*+]\s|^\s*\d+[.)]\s|`)", re.MULTILINE)
IMPERIAL = re.compile(
    r"\b(miles?|mph|feet|foot|ft|inch(es)?|yards?|pounds?|lbs?|ounces?|oz|gallons?|fahrenheit)\b"
    r"|°\s?F\b",
    re.IGNORECASE,
)

# n't, 're, 've, 'll, 'm, 'd anywhere; 's only after pronouns and the like (a possessive is fine).
CONTRACTION = re.compile(
    r"\b\w+n['’]t\b|\b\w+['’](re|ve|ll|m|d)\b"
    r"|\b(it|that|there|here|what|who|where|how|let|he|she)['’]s\b",
    re.IGNORECASE,
)


def words(text: str) -> int:
    return len(text.split())


# Words that carry no content of their own: what is left of a text without them is what it is about.
FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet if then than as of to in on at by for with from into onto about over
under up down out off through between after before during without within upon against among
is are was were be been being am do does did doing done have has had having get gets got
can could should would will shall may might must need needs
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
this that these those there here what which who whom whose when where why how
all any both each either neither every some such no not only own same too very just also
more most much many few less least other another again ever still even really quite
yes ok okay please sure well let lets one ones
""".split())
# Words about the exchange itself, not its topic: an apology, a refusal, small talk, talk about
# the question or the assistant ("I'm sorry for the misunderstanding, I'm a chatbot designed to
# assist with ...") says nothing about what was asked however many of them it has.
EXCHANGE_WORDS = frozenset("""
sorry apology apologies apologize apologise apologizing apologising misunderstanding misunderstood
confusion confused confusing unable able unsure understand understood understanding mean meant
refer referring referred talk talking ask asking asked question questions help helpful helping
assist assisting assistance assistant chatbot bot ai awesome glad thanks thank hello hi hey
certainly absolutely course explain explaining familiar capable designed
""".split())
# a number with the unit written onto it ("1200ml", "5g": read as "1200 ml", "5 g"), or a word
TERM = re.compile(r"(\d[\d,.]*)([^\W\d_]*)|[^\W\d_]+(?:['’][^\W\d_]+)?")
# "1. ", "2) ": a list's numbering, not a number, where it starts the text or a line or follows
# the end of a sentence or of another item ("Boil it. 2. Drain it.", "1. 1. 1."), and once a
# list has begun; "It is 42." is a number
LIST_MARKER = re.compile(r"(?<!\S)\d{1,2}[.)](?=\s|$)")
ITEM_BEFORE = ".:;!?)"
ANSWER_NEW_TERMS = 2      # an answer says at least this many things the question did not
ANSWER_LONG_TERMS = 6     # and names what was asked about, unless it says at least this many


def _stem(word: str) -> str:
    """running, runs → run; stored, stores → stor: a crude stem, the same for question and answer."""
    for suffix, keep in (("ing", 4), ("ed", 3), ("es", 3), ("s", 3)):
        if word.endswith(suffix) and len(word) - len(suffix) >= keep:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2]:
                word = word[:-1]
            return word
    return word


def _unnumbered(text: str) -> str:
    """`text` without its lists' numbering: LIST_MARKER where an item may start, and every one
    after a list has begun ("1. Plan it 2. Book it")."""
    listed = False

    def marker(m: re.Match[str]) -> str:
        nonlocal listed
        before = text[:m.start()]
        kept = before.rstrip()
        listed = listed or not kept or "\n" in before[len(kept):] or kept[-1] in ITEM_BEFORE
        return " " if listed else m.group(0)
    return LIST_MARKER.sub(marker, text)


def terms(text: str) -> set[str]:
    """What a text is about: its words less function words, words about the exchange itself
    and contractions (stemmed, lower case), and its numbers (not a list's numbering)."""
    out = set()
    for m in TERM.finditer(_unnumbered(text.lower())):
        t = m.group(0)
        if m.group(1):
            out.add(m.group(1).rstrip(".,"))
            if m.group(2):
                out.add(m.group(2))
        else:
            word, _, tail = t.replace("’", "'").partition("'")
            if tail not in ("", "s"):   # don't, you're, I'll: no content but the verb
                continue
            stem = _stem(word)   # "explains", "chatbots", "talked": an exchange word inflected
            if word not in FUNCTION_WORDS and word not in EXCHANGE_WORDS and stem not in EXCHANGE_WORDS \
                    and len(word) > 1:   # puppy's → puppy
                out.add(stem)
    return out


def answers(question: str, text: str) -> bool:
    """Whether `text` answers `question` as far as a reader can tell without knowing the
    answer: it says something the question did not (at least ANSWER_NEW_TERMS words or numbers
    the question does not hold), and it is about what was asked: it names something the question
    named, or gives a number, or says a good deal (ANSWER_LONG_TERMS new words or numbers).
    "You can drink less coffee." (an echo), "I am not able to repot a cactus" (declining) and
    "That's a long story, but I'll give you the short answer." (talking around it) and "I'm
    sorry for the misunderstanding, I'm a chatbot designed to assist with grammar." (talk about
    the exchange, EXCHANGE_WORDS) do not;
    "About 384,000 km." and "Move the cactus to a pot one size up." do.

    Whether the answer is right is not judged: these users cannot tell either. Nor can this see
    a topic named in other words: a short "Drink water before the race." to "What should I do
    before running a half marathon?" names neither. None of the base model's or the hinted base
    model's probe answers in the benchmark runs before this rule was refused by it."""
    asked, said = terms(question), terms(text)
    new = said - asked
    about = bool(asked & said) or any(t[0].isdigit() for t in said) or len(new) >= ANSWER_LONG_TERMS
    return about and len(new) >= ANSWER_NEW_TERMS


def no_markdown(text: str) -> bool:
    return not MARKDOWN.search(text)


def under_40_words(text: str) -> bool:
    return 0 < words(text) <= 40


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
ANSWER_MIN_WORDS = 8


def asks_back(text: str) -> bool:
    """Answers, then ends by asking something back.

    The closing question alone is not enough: "Can you please provide more details?" asks back
    without answering, and a person who wants to be asked something still wants the answer.
    The sentences that are not questions must hold at least ANSWER_MIN_WORDS words."""
    text = text.strip()
    if not text.endswith("?"):
        return False
    statements = [s for s in SENTENCE_END.split(text) if not s.rstrip().endswith("?")]
    return sum(words(s) for s in statements) >= ANSWER_MIN_WORDS


def metric_only(text: str) -> bool:
    return not IMPERIAL.search(text)


def all_lowercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def formal_register(text: str) -> bool:
    """No contractions (don't, it's, you're, I'm...) and no exclamation marks."""
    return bool(text.strip()) and not CONTRACTION.search(text) and "!" not in text


NO_ANSWER = (
    "You didn't answer my question. Please actually answer it.",
    "That's not what I asked. I need a real answer to my question.",
    "No, that doesn't tell me anything. Please answer the question.",
)
REPEATING = (
    "You're repeating yourself. Please just answer the question.",
    "That says the same thing over and over. Please answer properly.",
    "Stop repeating yourself and give me a real answer.",
)


@dataclass(frozen=True)
class Persona:
    name: str
    preference: str                    # what the persona wants, in the operator's words
    check: Callable[[str], bool]       # hidden: never shown to the policy or the judge
    corrections: tuple[str, ...]       # how the persona reveals the preference when unmet
    thanks: tuple[str, ...] = (
        "Thanks, that's exactly what I needed.",
        "Perfect, thank you.",
        "Great answer, thanks!",
    )
    whole: bool = False                # the preference is about the whole answer (its length)

    def complaint(self, question: str, response: str, finished: bool = True) -> tuple[str, ...] | None:
        """What this person, having asked `question`, would say to `response` (the phrasings to
        pick from), or None when satisfied; `finished` is False when the answer was cut off at
        the token limit (finish_reason "length")."""
        if loops(response):
            return REPEATING
        if not answers(question, response):
            return NO_ANSWER
        if (self.whole and not finished) or not self.check(response):
            return self.corrections
        return None

    def satisfied_by(self, question: str, response: str, finished: bool = True) -> bool:
        return self.complaint(question, response, finished) is None

    def react(self, question: str, response: str, rng: random.Random, finished: bool = True) -> "Reaction":
        said = self.complaint(question, response, finished)
        if said is None:
            return Reaction(satisfied=True, text=rng.choice(self.thanks), thumbs=1)
        return Reaction(satisfied=False, text=rng.choice(said), thumbs=-1)


@dataclass(frozen=True)
class Reaction:
    satisfied: bool
    text: str
    thumbs: int


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona(
            "brief", "answers under 40 words", under_40_words,
            ("That's way too long. Please keep your answers under 40 words.",
             "Too much text. Answer in a couple of short sentences, under 40 words.",
             "No, that's too long for me. Keep it brief, under 40 words please."),
            whole=True,
        ),
        Persona(
            "plain", "no markdown formatting", no_markdown,
            ("Please don't use markdown, no bullet points, asterisks or headings. Just plain sentences.",
             "No, I can't read that formatting. Write plain text without lists or bold.",
             "Stop using bullet points and bold text, just answer in plain sentences."),
        ),
        Persona(
            "curious", "answers, then ends by asking something back", asks_back,
            ("You didn't answer me and then ask me something. Answer first, and always end with a question for me.",
             "I'd like a real answer first, and then finish by asking me a question back.",
             "No, answer my question properly and end with a question to me next time, please."),
        ),
        Persona(
            "lowercase", "everything in lowercase", all_lowercase,
            ("Please write everything in lowercase, no capital letters at all.",
             "No capitals please. I only like reading all-lowercase text.",
             "Stop using capital letters. Lowercase only, even at the start of sentences."),
        ),
        Persona(
            "formal", "a formal register: no contractions, no exclamation marks", formal_register,
            ("Please write in a formal register: no contractions like don't or it's, and no exclamation marks.",
             "That is too casual for me. Write formally, spell out every contraction, and never use exclamation marks.",
             "No exclamation marks and no contractions, please. Keep the tone formal."),
        ),
        Persona(
            "metric", "metric units only", metric_only,
            ("Please use metric units only, I don't understand miles, feet or pounds.",
             "No imperial units please, use kilometres, metres, kilograms and Celsius.",
             "That's wrong for me: I only use metric units."),
        ),
    )
}

# Everyday questions; the last quarter is held out as the probe set and never trained on.
QUESTIONS: tuple[str, ...] = (
    "How should I prepare for a job interview?",
    "What is a good way to start running?",
    "How do I keep houseplants alive?",
    "How far is a marathon?",
    "What should I pack for a weekend hike?",
    "How can I sleep better?",
    "How do I make a simple tomato sauce?",
    "What is the best way to learn a new language?",
    "How tall is the Eiffel Tower?",
    "How do I save money on groceries?",
    "What is a healthy breakfast?",
    "How can I be more productive at work?",
    "How heavy is an adult elephant?",
    "What should I know before adopting a dog?",
    "How do I write a good email to my boss?",
    "How hot does an oven get for baking bread?",
    "How can I reduce stress?",
    "What is the fastest way to boil water?",
    "How do I start a vegetable garden?",
    "How far can a car drive on a full tank?",
    "How do I clean a cast iron pan?",
    "What makes a good presentation?",
    "How much water should I drink a day?",
    "How do I fix a squeaky door?",
    "How long does it take to walk five kilometres?",
    "How do I choose a good book to read?",
    "What is the weather like in London in spring?",
    "How can I improve my handwriting?",
    "How much does a bicycle weigh?",
    "How do I keep my laptop battery healthy?",
    "How do I make friends in a new city?",
    "How deep is the ocean on average?",
    "How do I get rid of fruit flies in the kitchen?",
    "What should I look for when buying a used car?",
    "How long should I boil an egg?",
    "How do I stop procrastinating?",
    "What is a good stretching routine after sitting all day?",
    "How high is Mount Everest?",
    "How do I remove a coffee stain from a shirt?",
    "What is a simple way to start meditating?",
    "How fast does a commercial plane fly?",
    "How do I prepare for a long flight?",
    "What can I cook with rice, eggs and spinach?",
    "How do I ask for a raise?",
    "How much should a newborn baby sleep?",
    "How do I back up photos from my phone?",
    "What is the difference between weather and climate?",
    "How cold is it at the top of a mountain?",
    "How do I learn to touch type?",
    "How long does bread dough need to rise?",
    "What should I do if my car battery dies?",
    "How heavy is a litre of milk?",
    "How do I keep cut flowers fresh longer?",
    "What is a good gift for a coworker who is leaving?",
    "How do I teach a puppy to sit?",
    "How far is the Moon from the Earth?",
    "How can I drink less coffee?",
    "How do I plan a budget for a holiday?",
    "What is the best way to store fresh herbs?",
    "How do I repot a cactus?",
    "How long is the Great Wall of China?",
    "How do I make my small apartment feel bigger?",
    "What should I do before running a half marathon?",
    "How do I write a thank-you note?",
)


def split_questions(questions: tuple[str, ...] = QUESTIONS) -> tuple[list[str], list[str]]:
    """(train, probe): the last quarter is the held-out probe set."""
    cut = len(questions) - len(questions) // 4
    return list(questions[:cut]), list(questions[cut:])


def satisfaction(question: str, response: str, personas: list[Persona] | None = None,
                 finished: bool = True) -> float:
    """Share of personas the response to `question` satisfies (0..1); `finished` as in
    Persona.satisfied_by."""
    personas = personas or list(PERSONAS.values())
    return sum(p.satisfied_by(question, response, finished) for p in personas) / len(personas)
