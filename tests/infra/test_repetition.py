"""What counts as an answer that loops (infra.repetition): sentences with where they stand,
and which sayings of a sentence are the loop."""

from __future__ import annotations

from infra.repetition import loops, max_sentence_repeats, repeated_sentences, sentence_spans, sentences


def test_sentences_stand_where_the_text_has_them_and_compare_by_their_words():
    text = "Hi there.  How ARE you?\nFine!\n\n- ok"
    spans = sentence_spans(text)
    assert [s.words for s in spans] == ["hi there", "how are you", "fine", "ok"] == sentences(text)
    assert [text[s.start:s.end] for s in spans] == ["Hi there.", "How ARE you?", "Fine!", "- ok"]
    # punctuation alone is no sentence; a decimal point does not end one
    assert sentences("... 2.5 kg is it.") == ["2 5 kg is it"] and sentence_spans("") == []


def test_a_numbered_list_that_repeats_an_item_loops_on_the_item_and_the_repeats_are_its_later_sayings():
    text = "Learn to type:\n1. Start with a keyboard.\n2. Practice.\n3. Practice.\n4. Practice."
    assert max_sentence_repeats(text) == 3 and loops(text)
    later = repeated_sentences(text)
    assert [text[s.start:s.end] for s in later] == ["Practice.", "Practice."]
    assert later[0].start == text.index("Practice", text.index("3."))
    # the list numbers themselves: "1. 1. 1. 2. 3." says "1" three times
    counting = "1. 1. 1. 2. 3."
    assert [(s.start, s.end) for s in repeated_sentences(counting)] == [(3, 5), (6, 8)]
    # twice is not a loop, and a text that does not loop has no repeats to push down
    twice = "Practice. Practice. Rest."
    assert not loops(twice) and repeated_sentences(twice) == []
