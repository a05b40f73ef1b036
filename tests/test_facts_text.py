"""Sentence splitting and leftmost-longest, exact-case entity mentions."""

from pretrace.bench.facts.text import MentionFinder, split_sentences


def test_sentences_end_at_punctuation_but_not_at_abbreviations_or_initials():
    text = (
        "2001: A Space Odyssey was co-written by Arthur C. Clarke. Its plot was inspired by \"The Sentinel\" (1951). "
        "Dr. Smith arrived in the U.S. in 1990. He was born c. 1200 in Paris! Was he? \"Yes,\" he said.\nA new line starts here."
    )
    assert split_sentences(text) == [
        "2001: A Space Odyssey was co-written by Arthur C. Clarke.",
        "Its plot was inspired by \"The Sentinel\" (1951).",
        "Dr. Smith arrived in the U.S. in 1990.",
        "He was born c. 1200 in Paris!",
        "Was he?",
        "\"Yes,\" he said.",
        "A new line starts here.",
    ]


def test_mentions_are_leftmost_longest_exact_case_and_ignore_punctuation():
    finder = MentionFinder({
        "United States": ["United States", "USA", "U.S."],
        "Guinea": ["Guinea"],
        "Papua New Guinea": ["Papua New Guinea"],
        "France": ["France"],
        "French": ["French"],
        "Nice": ["Nice"],
    })
    assert finder.mentions("The U.S. and Papua New Guinea signed it.") == {"United States", "Papua New Guinea"}
    assert finder.mentions("Papua New Guinea and Guinea") == {"Papua New Guinea", "Guinea"}
    assert finder.mentions("The French army left France's coast.") == {"French", "France"}
    assert finder.mentions("A nice day in the us.") == set()  # exact case: "nice" is not Nice, "us" not US
