"""The answer-quality measures of the personal-agent benchmark, on hand-made answers."""

from infra.repetition import max_sentence_repeats, sentences
import pytest

from producers.simulated.quality import distinct_bigram_share, looping, unanswered


def test_distinct_bigrams_fall_with_repetition():
    varied = ["boil the egg for nine minutes", "a marathon is about 42 kilometres"]
    assert distinct_bigram_share(varied) == 1.0
    repeated = ["boil the egg. boil the egg. boil the egg.", "boil the egg"]
    # bigrams: (boil the) (the egg) (egg boil) ×2 ... 8 in the first answer, 2 in the second; 3 distinct
    assert distinct_bigram_share(repeated) == 3 / 10
    assert distinct_bigram_share([]) == 1.0 and distinct_bigram_share(["one"]) == 1.0


def test_sentence_repeats_ignore_case_and_punctuation():
    loop = "1. Boil the egg until it is dry.\n2. Boil the egg until it is dry!\nboil the egg until it is dry"
    assert sentences("Hi there. How are you?\nFine") == ["hi there", "how are you", "fine"]
    assert max_sentence_repeats("It is tall. It is tall. Really.") == 2
    assert max_sentence_repeats(loop) == 3
    assert looping([loop, "One answer. Another sentence."]) == 1
    assert max_sentence_repeats("") == 0


def test_answers_that_do_not_answer_are_counted():
    asked = ["How long should I boil an egg?"] * 3
    assert unanswered(asked, ["The answer.", "Boil it for nine minutes, then cool it in water.", ""]) == 2 / 3
    assert unanswered([], []) == 0.0
    with pytest.raises(ValueError, match="2 answers to 3 questions"):
        unanswered(asked, ["a", "b"])
