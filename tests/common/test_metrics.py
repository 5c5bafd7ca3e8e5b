"""Tests for eardrum.common.metrics: hand-computed values on small fixed examples."""

from __future__ import annotations

import math

import pytest

from eardrum.common.metrics import (
    bleu,
    character_error_rate,
    cider,
    contains_answer,
    exact_match,
    normalize_text,
    word_error_rate,
)

REF = "the cat sat on the mat"
HYP = "the cat sit on mat"


# normalize_text: one case per documented rule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\uff21\uff22\uff23 \ufb01ne x\u00b2", "abc fine x2"),  # NFKC: full-width, ligature, superscript
        ("The CAT", "the cat"),  # lowercase
        ("don\u2019t", "don't"),  # typographic apostrophe
        ("1,000,000 and 1,2,3", "1000000 and 1 2 3"),  # thousands comma only before three digits
        ("50% & more", "50 percent and more"),  # % and &
        ("well-known \u2014 fact", "well known fact"),  # hyphens and dashes
        ("Hello, world! (yes) $5 + 6 = \U0001f600", "hello world yes 5 6"),  # punctuation and symbols
        ("'quoted' dogs' rock'n'roll", "quoted dogs rock'n'roll"),  # apostrophes only inside words
        ("3.5 vs. 3. End.", "3.5 vs 3 end"),  # periods only between digits
        ("  a\t b\n\nc  ", "a b c"),  # whitespace
        ("I can't, it's 7 percent", "i can't it's 7 percent"),  # contractions and spelled symbols kept
        ("caf\u00e9 na\u00efve", "caf\u00e9 na\u00efve"),  # accented letters are letters
    ],
)
def test_normalize_text_rules(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_normalize_text_does_not_spell_out_numbers() -> None:
    assert normalize_text("Two") == "two"
    assert normalize_text("2") == "2"


def test_normalize_text_is_idempotent() -> None:
    for text in ["Don\u2019t stop -- 1,000 cats & 3.5% dogs.", "'a' b-c"]:
        once = normalize_text(text)
        assert normalize_text(once) == once


# word and character error rates


def test_wer_counts_substitution_and_deletion() -> None:
    assert word_error_rate([REF], [HYP]) == {
        "wer": 2 / 6,
        "substitutions": 1,
        "deletions": 1,
        "insertions": 0,
        "hits": 4,
        "reference_words": 6,
    }


def test_wer_pools_counts_over_the_corpus() -> None:
    # (1 sub + 1 del) over 6 words and 1 insertion over 2 words: 3 / 8, not the mean of 1/3 and 1/2.
    out = word_error_rate([REF, "good morning"], [HYP, "good morning sir"])
    assert out["wer"] == 3 / 8
    assert (out["substitutions"], out["deletions"], out["insertions"], out["hits"]) == (1, 1, 1, 6)


def test_wer_normalizes_unless_disabled() -> None:
    assert word_error_rate(["Hello, World!"], ["hello world"])["wer"] == 0.0
    assert word_error_rate(["Hello, World!"], ["hello world"], normalize=False)["substitutions"] == 2


def test_wer_empty_reference_counts_hypothesis_words_as_insertions() -> None:
    out = word_error_rate([REF, "..."], [REF, "uh huh"])
    assert (out["insertions"], out["reference_words"], out["wer"]) == (2, 6, 2 / 6)


def test_wer_without_reference_words_is_zero_or_infinite() -> None:
    assert word_error_rate([""], [""])["wer"] == 0.0
    assert word_error_rate([""], ["hi"])["wer"] == math.inf


def test_wer_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match="references has 2 items but hypotheses has 1"):
        word_error_rate(["a", "b"], ["a"])


def test_wer_rejects_a_single_string() -> None:
    with pytest.raises(TypeError, match="references must be a list"):
        word_error_rate("a b", ["a b"])


def test_wer_rejects_an_empty_corpus() -> None:
    with pytest.raises(ValueError, match="at least one item"):
        word_error_rate([], [])


def test_cer_counts_characters_including_spaces() -> None:
    # "sat" -> "sit" is 1 substitution; "the " dropped is 4 deletions; the reference has 22 characters.
    assert character_error_rate([REF], [HYP]) == {
        "cer": 5 / 22,
        "substitutions": 1,
        "deletions": 4,
        "insertions": 0,
        "hits": 17,
        "reference_chars": 22,
    }


def test_cer_empty_reference_counts_hypothesis_characters_as_insertions() -> None:
    out = character_error_rate(["abc", ""], ["abd", "hi"])
    assert (out["substitutions"], out["insertions"], out["reference_chars"], out["cer"]) == (1, 2, 3, 1.0)


# exact match and contained answer


def test_exact_match_normalizes_and_averages() -> None:
    assert exact_match(["The cat.", "a dog", "Paris!"], ["the cat", "the dog", "paris"]) == 2 / 3


def test_exact_match_accepts_a_list_of_answers() -> None:
    assert exact_match(["two", "2"], [["2", "two"], ["2", "two"]]) == 1.0


def test_exact_match_rejects_an_empty_answer_list() -> None:
    with pytest.raises(ValueError, match=r"answers\[1\] is an empty list"):
        exact_match(["a", "b"], ["a", []])


def test_contains_answer_respects_word_boundaries() -> None:
    assert contains_answer(["it is 100 km away", "it is 10 km away"], ["10", "10"]) == 0.5


def test_contains_answer_matches_word_sequences_and_lists() -> None:
    preds = ["I think it is a Golden Retriever.", "a cat", "maybe a dog"]
    answers = ["golden retriever", ["kitten", "cat"], ["hot dog"]]
    assert contains_answer(preds, answers) == 2 / 3


def test_contains_answer_rejects_an_answer_empty_after_normalization() -> None:
    with pytest.raises(ValueError, match=r"answers\[0\]"):
        contains_answer(["anything"], ["?!"])


# BLEU


def test_bleu_on_a_worked_example() -> None:
    # hyp "the cat sat on the red mat" (7 words), ref "the cat sat on the mat" (6 words):
    #   p1 = 6/7 (all but "red"; "the" twice in both), p2 = 4/6 (not "the red", "red mat"),
    #   p3 = 3/5 (not "on the red", "the red mat"), p4 = 2/4 ("the cat sat on", "cat sat on the")
    #   c = 7 > r = 6, so BP = 1;  BLEU = (6/7 * 4/6 * 3/5 * 2/4) ** (1/4) = (6/35) ** 0.25 = 0.6434...
    assert bleu(["the cat sat on the red mat"], [[REF]]) == pytest.approx((6 / 35) ** 0.25, rel=1e-12)


def test_bleu_clips_repeated_words_to_the_reference_count() -> None:
    # Papineni et al.'s example: "the" appears at most twice in a reference, so p1 = 2/7; the
    # reference lengths are 6 and 7, the closest to c = 7 is 7, so BP = 1.
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    assert bleu(["the the the the the the the"], refs, max_n=1) == pytest.approx(2 / 7, rel=1e-12)


def test_bleu_perfect_match_is_one() -> None:
    assert bleu([REF, "a b c d e"], [[REF], ["x", "a b c d e"]]) == 1.0


def test_bleu_brevity_penalty() -> None:
    # Every n-gram of "the cat sat on" matches (p1..p4 = 1); c = 4 < r = 6, so BP = exp(1 - 6/4).
    assert bleu(["the cat sat on"], [[REF]]) == pytest.approx(math.exp(-0.5), rel=1e-12)


def test_bleu_pools_counts_over_the_corpus() -> None:
    # max_n = 2: p1 = (2 + 1) / 4, p2 = (1 + 0) / 2, c = r = 4 so BP = exp(0) = 1: sqrt(3/4 * 1/2).
    assert bleu(["a b", "c d"], [["a b"], ["c e"]], max_n=2) == pytest.approx(math.sqrt(3 / 8), rel=1e-12)


def test_bleu_is_zero_without_a_four_gram_match_unless_smoothed() -> None:
    # hyp "a b c d", ref "a b x d": p1 = 3/4, p2 = 1/3, p3 = 0/2, p4 = 0/1, c = r = 4.
    assert bleu(["a b c d"], [["a b x d"]]) == 0.0
    # Smoothed: p2 = 2/4, p3 = 1/3, p4 = 1/2: (3/4 * 1/2 * 1/3 * 1/2) ** (1/4) = (1/16) ** (1/4) = 0.5.
    assert bleu(["a b c d"], [["a b x d"]], smooth=True) == pytest.approx(0.5, rel=1e-12)


# CIDEr-D


def test_cider_exact_matches_in_a_single_reference_corpus() -> None:
    # Two items, one reference each, candidates equal to their references. "a" is in both items'
    # references, so its weight is log(2/2) = 0; every other n-gram has weight log(2/1) > 0. A
    # candidate equal to its reference has cosine 1 for each n it has n-grams of, and no length penalty:
    #   "a cat sits" (3 words): n = 1, 2, 3 give 1, n = 4 gives 0 -> 10 * 3/4 = 7.5
    #   "a dog runs fast" (4 words): n = 1..4 give 1 -> 10 * 4/4 = 10;  corpus mean (7.5 + 10) / 2 = 8.75
    refs = [["a cat sits"], ["a dog runs fast"]]
    assert cider(["a cat sits", "a dog runs fast"], refs) == pytest.approx(8.75, rel=1e-12)


def test_cider_scores_a_better_caption_higher() -> None:
    refs = [
        ["a man rides a horse", "a person riding a horse on a beach"],
        ["two dogs play in the snow"],
        ["a child eats a red apple"],
    ]
    rest = ["dogs play in snow", "a child eats an apple"]
    good = cider(["a man riding a horse on the beach", *rest], refs)
    fair = cider(["a man on a horse", *rest], refs)
    poor = cider(["a man sits on a chair", *rest], refs)
    assert good > fair > poor > 0.0


def test_cider_is_zero_for_disjoint_vocabulary() -> None:
    refs = [["a cat sits"], ["a dog runs fast"]]
    assert cider(["blue sky", "green grass grows"], refs) == 0.0


def test_cider_is_zero_for_a_single_item_corpus() -> None:
    # With N = 1 every weight is log(1/1) = 0.
    assert cider(["a cat sits"], [["a cat sits"]]) == 0.0


def test_cider_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match="hypotheses has 1 items but references_list has 2"):
        cider(["a"], [["a"], ["b"]])


# ------------------------------------------------------------------ against the maintained implementations

CAPTIONS = ["a man is speaking", "rain falls", "a dog barks twice and a car passes by",
            "birds are singing in the morning near a river"]
CAPTION_REFERENCES = [
    ["a man speaks", "someone speaks", "a man is speaking while a bird is chirping in the background"],
    ["rain is falling hard on a surface"],
    ["a dog barks twice while a car passes by", "a car drives past and a dog barks"],
    ["birds are singing near a river in the morning", "many birds sing by a river"],
]


def test_bleu_equals_sacrebleu_on_the_same_words() -> None:
    """On texts already in eardrum's normal form (so 13a tokenisation splits them at spaces too), our corpus
    BLEU-4 is sacrebleu's: the same clipped counts, brevity penalty and closest reference length; with a
    variable number of references per item."""
    from eardrum.common.metrics import sacrebleu_bleu

    ours = bleu(CAPTIONS, CAPTION_REFERENCES)
    theirs, signature = sacrebleu_bleu(CAPTIONS, CAPTION_REFERENCES)
    assert ours > 0.2 and ours == pytest.approx(theirs, abs=1e-9)
    assert signature.startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    # where some n has no match at all they part: ours is 0, sacrebleu's default exp smoothing is not (which is
    # why `eardrum eval` reports both)
    few, few_refs = CAPTIONS[:2], [r[:1] for r in CAPTION_REFERENCES[:2]]
    assert bleu(few, few_refs) == 0.0 < sacrebleu_bleu(few, few_refs)[0] < 0.2


def test_cider_d_gives_the_value_aac_metrics_publishes_for_its_example() -> None:
    """aac-metrics' README: cider_d(["a man is speaking", "rain falls"], [...]) -> 0.9614 (after its PTB
    tokeniser, which lower-cases and drops the full stops as our normaliser does)."""
    candidates = ["a man is speaking", "rain falls"]
    references = [["a man speaks.", "someone speaks.", "a man is speaking while a bird is chirping in the background"],
                  ["rain is falling hard on a surface"]]
    assert cider(candidates, references) == pytest.approx(0.9614, abs=5e-5)


def test_wer_under_whispers_normaliser_forgives_what_published_wers_forgive() -> None:
    from eardrum.common.metrics import whisper_normalize, word_error_rate_whisper

    refs = ["Mr. Smith paid twenty-five dollars for the colour print.", "It is 5 o'clock."]
    hyps = ["mister smith paid $25 for the color print", "it's five o'clock"]
    assert whisper_normalize("Mr. Smith, colour!") == "mister smith color"
    assert word_error_rate(refs, hyps)["wer"] > 0.3  # ours counts the spellings and numbers as errors
    assert word_error_rate_whisper(refs, hyps)["wer"] == pytest.approx(0.0)
    assert word_error_rate_whisper(["the cat sat"], ["the cat"])["deletions"] == 1
