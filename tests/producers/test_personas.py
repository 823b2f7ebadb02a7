"""Personas: each checker judges its hidden preference, and reactions reveal it only in words."""

from __future__ import annotations

import random

import re

from processors.judges.feedback import APPROVAL_PATTERNS, CORRECTION_PATTERNS
from producers.simulated.personas import (NO_ANSWER, PERSONAS, QUESTIONS, REPEATING, answers, satisfaction,
                                          split_questions, terms)

Q = "How do I repot a cactus?"


def test_checkers():
    brief, plain, curious, metric = (PERSONAS[n].check for n in ("brief", "plain", "curious", "metric"))
    assert brief("Drink water and rest.") and not brief(" ".join(["word"] * 41)) and not brief("")
    assert plain("Just plain text here.")
    assert not plain("**Bold** claim") and not plain("- item one\n- item two") and not plain("1. first")
    assert not plain("# Heading\ntext") and not plain("use `code`")
    assert curious("A marathon is 42 km long, a little over 26 miles. Have you run one before?")
    assert not curious("It is 42 km.") and not curious("A marathon is 42 km long, a little over 26 miles.")
    # asking back without answering is not what this person wants
    assert not curious("I'm sorry for any confusion. Can you please provide more details?")
    assert not curious("What do you mean? Which marathon are you asking about?")
    assert metric("About 42 kilometres.") and not metric("About 26 miles.") and not metric("350 °F")
    lowercase, formal = PERSONAS["lowercase"].check, PERSONAS["formal"].check
    assert lowercase("it is 42 km, about 26 miles.") and not lowercase("It is 42 km.") and not lowercase("42")
    assert formal("It is 42 km. The runner's pace matters.") and not formal("It's 42 km.")
    assert not formal("You don't need more.") and not formal("We'll see.") and not formal("Great question!")


def test_reaction_reveals_preference_without_the_checker():
    rng = random.Random(0)
    long_markdown = ("**Tips**\n- one\n- two\nIt's easy! Start running slowly, three times a week.\n"
                     + "more words " * 30)
    for persona in PERSONAS.values():
        reaction = persona.react("How do I start running?", long_markdown, rng)
        if persona.name == "metric":
            assert reaction.satisfied and reaction.thumbs == 1
            continue
        assert not reaction.satisfied and reaction.thumbs == -1
        assert reaction.text in persona.corrections


def test_nobody_takes_a_loop_and_brief_takes_no_cut_off_answer():
    rng = random.Random(0)
    # Under 40 words and formal, lowercase-free of markdown... and still no answer.
    loop = "1. 1. 1. 1. 1. 1. 1. 1. 1. 1. 1. 1. 1. 1. 1."
    sentence_loop = "Use a pot. " * 3 + "Water it."
    for persona in PERSONAS.values():
        for text in (loop, sentence_loop):
            reaction = persona.react(Q, text, rng)
            assert not reaction.satisfied and reaction.thumbs == -1 and reaction.text in REPEATING
    # The feedback judge reads each of those words as a correction (reward -1, and the hint).
    for text in REPEATING + NO_ANSWER:
        assert any(re.search(p, text, re.IGNORECASE) for p in CORRECTION_PATTERNS)
        assert not any(re.search(p, text, re.IGNORECASE) for p in APPROVAL_PATTERNS)
    brief, formal = PERSONAS["brief"], PERSONAS["formal"]
    short = "Repot it in spring, in a pot one size up, with cactus soil"
    assert brief.satisfied_by(Q, short) and not brief.satisfied_by(Q, short, finished=False)
    cut = brief.react(Q, short, rng, finished=False)
    assert not cut.satisfied and cut.text in brief.corrections
    # A preference about the style, not the length, can be judged on what was said so far.
    assert formal.satisfied_by(Q, short, finished=False)
    assert satisfaction(Q, short, [brief, formal], finished=False) == 0.5
    assert satisfaction(Q, loop, [brief, formal]) == 0.0


def test_an_answer_says_something_about_what_was_asked():
    assert terms("The puppy's bowl, running and runs; don't you're 42 km.\n1. 384,000 kg") == {
        "puppy", "bowl", "run", "42", "km", "384,000", "kg"}   # "1. " numbers a list
    # a list's numbering starts the text, a line, or follows a sentence or an item; a number
    # that ends a sentence is a number, and a unit reads the same written on or apart
    assert terms("Boil it. 2. Drain it.\n3) Salt it. 1. 1. 1.") == {"boil", "drain", "salt"}
    assert terms("It is 42.") == {"42"} and terms("It is 12. Then rest.") == {"12", "rest"}
    assert terms("1. Plan it 2. Book it 3") == {"plan", "book", "3"}   # once a list has begun
    assert terms("About 1200ml") == terms("about 1200 ml") == {"1200", "ml"}
    coffee, moon = "How can I drink less coffee?", "How far is the Moon from the Earth?"
    # an echo, declining, talking around it, an empty preamble
    for question, text in ((coffee, "You can drink less coffee."), (Q, "I am not able to repot a cactus"),
                           (moon, "That's a long story, but I'll give you the short answer."),
                           (moon, "The answer to this question is:"), (Q, "1. Repot the cactus. 2. 3."),
                           # talk about the exchange, however long
                           (Q, "Awesome question, but I'm not a cactus expert."),
                           (moon, "I'm sorry for the misunderstanding, but I'm a chatbot designed to assist with "
                                  "digital interactions. I'm unable to help."),
                           # the same words inflected
                           (moon, "The Moon? Chatbots apologized and explained that, sorry.")):
        assert not answers(question, text), text
    for question, text in ((moon, "About 384,000 km."), (Q, "Move the cactus to a pot one size up."),
                           ("How heavy is a litre of milk?", "A litre of milk is 1030g."),
                           (moon, "The answer is: 384,400."), (Q, "Make sure the new pot drains, and wear gloves."),
                           (coffee, "Swap the afternoon cup for tea and cut one cup a week."),
                           # names nothing asked about, but says a good deal
                           ("How do I teach a puppy to sit?",
                            "1. Hold a treat above the nose.\n2. Wait until the bottom drops.\n3. Reward at once.")):
        assert answers(question, text), text
    # short and formal, and no answer: every persona says so, in words the judge reads as a correction
    rng = random.Random(0)
    for persona in PERSONAS.values():
        reaction = persona.react(coffee, "You can drink less coffee.", rng)
        assert not reaction.satisfied and reaction.thumbs == -1 and reaction.text in NO_ANSWER


def test_one_response_can_satisfy_everyone():
    good = "a marathon is about 42 kilometres, and most runners train for months. are you planning to run one?"
    assert satisfaction("How far is a marathon?", good) == 1.0
    # short and formal, but bold, imperial, no question, capitals
    assert satisfaction("How far is a marathon?", "A marathon is **26 miles**.") == 2 / 6


def test_probe_questions_are_held_out():
    train, probe = split_questions()
    assert len(probe) == len(QUESTIONS) // 4
    assert not set(train) & set(probe)
