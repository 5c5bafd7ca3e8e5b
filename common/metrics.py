"""Evaluation metrics for transcripts, answers and captions: WER, CER, exact/contains match, BLEU, CIDEr-D.

Beside our own: WER under Whisper's English normaliser (`word_error_rate_whisper`) and sacrebleu's BLEU with its
signature (`sacrebleu_bleu`), the maintained implementations published numbers come from. Our BLEU is tested
equal to sacrebleu's on the same tokens, and our CIDEr-D equal to the value aac-metrics publishes for its
example (tests/common/test_metrics.py).

Every metric compares texts after `normalize_text` unless called with `normalize=False`, so that
casing and punctuation do not count as errors. Corpus metrics pool counts over all items before
dividing (a long utterance weighs more than a short one), as the usual definitions do.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import jiwer

Alternatives = str | Sequence[str]  # one acceptable text, or several for the same item
NGram = tuple[str, ...]

CIDER_MAX_N = 4
CIDER_SIGMA = 6.0  # Gaussian length penalty width, in words (CIDEr-D)

_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
_LOOSE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def _is_kept_char(ch: str) -> bool:
    # Letters, combining marks and digits of any script are words; everything else separates them.
    return ch.isspace() or ch in "'." or unicodedata.category(ch)[0] in "LMN"


def normalize_text(text: str) -> str:
    """Normalise English text for comparison. The rules, applied in this order:

    1. Unicode NFKC (full-width forms, ligatures and superscripts become plain characters).
    2. Lowercase.
    3. Typographic apostrophes (U+2018, U+2019, U+02BC) become "'".
    4. A comma between digits followed by exactly three digits is dropped: "1,000,000" -> "1000000".
    5. "%" -> " percent ", "&" -> " and ".
    6. Every character that is not a letter, combining mark, digit, apostrophe or period becomes
       a space; this removes punctuation and symbols ("$", "+", emoji) and turns hyphens and
       dashes into spaces ("well-known" -> "well known").
    7. An apostrophe is kept only between two word characters ("don't", "rock'n'roll"); quotes and
       possessive plurals lose it ("'hi'" -> "hi", "dogs'" -> "dogs").
    8. A period is kept only between two digits ("3.5" stays); all other periods become spaces.
    9. Whitespace is collapsed to single spaces and stripped.

    Contractions and spelled-out symbols are left as written ("don't" stays, "percent" stays), and
    numbers are NOT spelled out or parsed, so "two" and "2" differ: rewriting numbers needs a
    grammar that guesses at readings ("1990" as a year or a count), and a metric that only
    removes formatting is easier to trust and to reproduce.
    """
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    text = _THOUSANDS_COMMA.sub("", text)
    text = text.replace("%", " percent ").replace("&", " and ")
    text = "".join(ch if _is_kept_char(ch) else " " for ch in text)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    text = _LOOSE_PERIOD.sub(" ", text)
    return " ".join(text.split())


def _check_pairs(first: Sequence, second: Sequence, first_name: str, second_name: str) -> None:
    for name, value in ((first_name, first), (second_name, second)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of items, got a single str {value[:40]!r}")
    if len(first) != len(second):
        raise ValueError(f"{first_name} has {len(first)} items but {second_name} has {len(second)}")
    if not first:
        raise ValueError(f"{first_name} and {second_name} are empty; a metric needs at least one item")


def _prepare(text: str, normalize: bool) -> str:
    # Without normalisation whitespace is still collapsed, so words split the same way everywhere.
    return normalize_text(text) if normalize else " ".join(text.split())


def _alternatives(value: Alternatives, index: int, name: str) -> list[str]:
    options = [value] if isinstance(value, str) else list(value)
    if not options:
        raise ValueError(f"{name}[{index}] is an empty list; give at least one acceptable text")
    return options


def _edit_counts(references: Sequence[str], hypotheses: Sequence[str], normalize: bool, chars: bool) -> dict[str, int]:
    """Pooled alignment counts; a reference that is empty after preparation turns every unit of its
    hypothesis into an insertion (counted here, as the alignment library may refuse empty references)."""
    _check_pairs(references, hypotheses, "references", "hypotheses")
    refs = [_prepare(t, normalize) for t in references]
    hyps = [_prepare(t, normalize) for t in hypotheses]
    units = len if chars else (lambda s: len(s.split()))
    empty_ref_words = sum(units(h) for r, h in zip(refs, hyps) if not r)
    counts = {"substitutions": 0, "deletions": 0, "insertions": empty_ref_words, "hits": 0}
    kept = [(r, h) for r, h in zip(refs, hyps) if r]
    if kept:
        process = jiwer.process_characters if chars else jiwer.process_words
        out = process([r for r, _ in kept], [h for _, h in kept])
        for key in counts:
            counts[key] += getattr(out, key)
    counts["reference"] = sum(units(r) for r in refs)
    return counts


def _rate(counts: dict[str, int]) -> float:
    edits = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    if counts["reference"] == 0:
        # Nothing to recognise: any output at all is infinitely wrong, silence is perfect.
        return 0.0 if edits == 0 else math.inf
    return edits / counts["reference"]


def word_error_rate(references: list[str], hypotheses: list[str], normalize: bool = True) -> dict[str, int | float]:
    """Corpus word error rate, WER = (S + D + I) / N, with S, D, I the substitutions, deletions and
    insertions of a minimum-edit alignment summed over items and N the total reference words.

    A reference that is empty (after normalisation) adds no reference words and counts each word of
    its hypothesis as an insertion. If the whole corpus has no reference words, WER is 0.0 when the
    hypotheses are empty too and `math.inf` otherwise.

    Returns:
        {"wer", "substitutions", "deletions", "insertions", "hits", "reference_words"}.
    """
    counts = _edit_counts(references, hypotheses, normalize, chars=False)
    rate, reference = _rate(counts), counts.pop("reference")
    return {"wer": rate, **counts, "reference_words": reference}


def character_error_rate(
    references: list[str], hypotheses: list[str], normalize: bool = True
) -> dict[str, int | float]:
    """Corpus character error rate, CER = (S + D + I) / N over characters, spaces between words
    included; empty references are handled as in `word_error_rate`.

    Returns:
        {"cer", "substitutions", "deletions", "insertions", "hits", "reference_chars"}.
    """
    counts = _edit_counts(references, hypotheses, normalize, chars=True)
    rate, reference = _rate(counts), counts.pop("reference")
    return {"cer": rate, **counts, "reference_chars": reference}


def exact_match(predictions: list[str], answers: list[Alternatives], normalize: bool = True) -> float:
    """Fraction of items whose prediction equals one of its acceptable answers (after normalisation)."""
    _check_pairs(predictions, answers, "predictions", "answers")
    hits = 0
    for i, (pred, ans) in enumerate(zip(predictions, answers)):
        options = {_prepare(a, normalize) for a in _alternatives(ans, i, "answers")}
        hits += _prepare(pred, normalize) in options
    return hits / len(predictions)


def contains_answer(predictions: list[str], answers: list[Alternatives], normalize: bool = True) -> float:
    """Fraction of items whose prediction contains one of its answers as a whole-word sequence:
    "10" is found in "it is 10 km" but not in "it is 100 km". An answer that is empty after
    normalisation would match everything, so it raises ValueError."""
    _check_pairs(predictions, answers, "predictions", "answers")
    hits = 0
    for i, (pred, ans) in enumerate(zip(predictions, answers)):
        options = [_prepare(a, normalize) for a in _alternatives(ans, i, "answers")]
        if not all(options):
            raise ValueError(f"answers[{i}] = {ans!r} has an answer that is empty after normalisation")
        # Prepared texts have single spaces, so padding with spaces makes `in` respect word boundaries.
        padded = f" {_prepare(pred, normalize)} "
        hits += any(f" {option} " in padded for option in options)
    return hits / len(predictions)


def _ngrams(tokens: list[str], n: int) -> Counter[NGram]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    hypotheses: list[str],
    references_list: list[Alternatives],
    max_n: int = 4,
    *,
    smooth: bool = False,
    normalize: bool = True,
) -> float:
    """Corpus BLEU (Papineni et al., 2002) on whitespace tokens of the normalised texts.

    BLEU = BP * exp(sum_n log(p_n) / max_n), with p_n the clipped n-gram matches (each candidate
    n-gram counted at most as often as in the reference that has it most) over all candidate n-grams,
    pooled over the corpus; BP = 1 if c > r else exp(1 - r / c), with c the total candidate length
    and r the sum over items of the reference length closest to the candidate's (the shorter on ties).

    Without smoothing any p_n = 0 makes the score 0. `smooth=True` adds one to the numerator and
    denominator of p_n for n > 1 (Lin and Och, 2004), so short texts without a 4-gram match still
    rank. Returns a value in [0, 1].
    """
    _check_pairs(hypotheses, references_list, "hypotheses", "references_list")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for i, (hyp, refs) in enumerate(zip(hypotheses, references_list)):
        cand = _prepare(hyp, normalize).split()
        ref_tokens = [_prepare(r, normalize).split() for r in _alternatives(refs, i, "references_list")]
        hyp_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            most: Counter[NGram] = Counter()
            for r in ref_tokens:
                most |= _ngrams(r, n)  # `|` keeps the larger count of each n-gram
            matches[n - 1] += sum((_ngrams(cand, n) & most).values())  # `&` clips to it
            totals[n - 1] += max(len(cand) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for n, (num, den) in enumerate(zip(matches, totals), start=1):
        if smooth and n > 1:
            num, den = num + 1, den + 1
        if num == 0:
            return 0.0
        log_precision += math.log(num / den) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _tfidf(tokens: list[str], df: Counter[NGram], log_items: float) -> tuple[list[dict[NGram, float]], list[float]]:
    """Per n = 1..4: {n-gram: count * idf} and its Euclidean norm."""
    vectors = []
    for n in range(1, CIDER_MAX_N + 1):
        vectors.append({g: c * (log_items - math.log(max(1.0, df[g]))) for g, c in _ngrams(tokens, n).items()})
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms


def _cider_item(cand: list[str], refs: list[list[str]], df: Counter[NGram], log_items: float) -> float:
    cand_vecs, cand_norms = _tfidf(cand, df, log_items)
    total = 0.0
    for ref in refs:
        ref_vecs, ref_norms = _tfidf(ref, df, log_items)
        penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * CIDER_SIGMA**2))
        for cv, rv, cn, rn in zip(cand_vecs, ref_vecs, cand_norms, ref_norms):
            if cn > 0 and rn > 0:
                # min() with a shared idf clips the candidate count to the reference count.
                dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in cv.items())
                total += penalty * dot / (cn * rn)
    return 10.0 * total / (CIDER_MAX_N * len(refs))


def cider(hypotheses: list[str], references_list: list[Alternatives], *, normalize: bool = True) -> float:
    """Corpus CIDEr-D (Vedantam et al., 2015): the mean over items of

        10 / (4 m) * sum_{j=1..m} sum_{n=1..4} exp(-(l_c - l_j)^2 / (2 * 6^2))
                     * <min(g_n(c), g_n(s_j)), g_n(s_j)> / (|g_n(c)| |g_n(s_j)|)

    for a candidate c with m references s_j of lengths l_c and l_j in words. g_n(x) holds, for each
    n-gram, its count in x times log(N / max(1, df)), where N is the number of items and df the
    number of items whose references contain the n-gram: n-grams that every item's references share
    weigh nothing. The count is raw, as in the authors' released scorer whose numbers papers report.
    An n the candidate or reference is too short for contributes 0, so an exact match of a
    three-word reference scores 7.5, not 10. With a single item every weight is log(1) = 0 and the
    score is 0; CIDEr is only meaningful over a corpus.
    """
    _check_pairs(hypotheses, references_list, "hypotheses", "references_list")
    cands = [_prepare(h, normalize).split() for h in hypotheses]
    refs = [
        [_prepare(r, normalize).split() for r in _alternatives(item, i, "references_list")]
        for i, item in enumerate(references_list)
    ]
    df: Counter[NGram] = Counter()
    for item_refs in refs:
        df.update({g for r in item_refs for n in range(1, CIDER_MAX_N + 1) for g in _ngrams(r, n)})
    log_items = math.log(len(cands))
    return sum(_cider_item(c, r, df, log_items) for c, r in zip(cands, refs)) / len(cands)


# ------------------------------------------------------------------ the maintained implementations papers use

@functools.cache
def _whisper_english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def whisper_normalize(text: str) -> str:
    """Whisper's English text normaliser (the `whisper-normalizer` package, the one published LibriSpeech and
    Open ASR Leaderboard WERs use): lower case, punctuation removed, British spellings made American, numbers
    written as digits ("twenty-five" -> "25"), titles spelt out ("Mr." -> "mister"), fillers dropped."""
    return _whisper_english_normalizer()(text)


def word_error_rate_whisper(references: list[str], hypotheses: list[str]) -> dict[str, int | float]:
    """`word_error_rate` after `whisper_normalize` on both sides: the WER that can be set beside published
    results. Same keys as `word_error_rate`."""
    _check_pairs(references, hypotheses, "references", "hypotheses")
    return word_error_rate([whisper_normalize(r) for r in references], [whisper_normalize(h) for h in hypotheses],
                           normalize=False)


def sacrebleu_bleu(hypotheses: list[str], references_list: list[Alternatives]) -> tuple[float, str]:
    """Corpus BLEU-4 as sacrebleu computes it (its default 13a tokeniser, case-sensitive, no normalisation of
    ours), in [0, 1], and sacrebleu's signature string, which says exactly how (report it beside the score).
    Items may have different numbers of references."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references_list, "hypotheses", "references_list")
    refs = [_alternatives(item, i, "references_list") for i, item in enumerate(references_list)]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), streams)
    return score.score / 100, str(metric.get_signature())


@functools.cache
def sacrebleu_settings() -> str:
    """sacrebleu's signature for `sacrebleu_bleu` without its `nrefs` field (which depends on the data): the
    tokeniser, casing, smoothing and version, e.g. "case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"."""
    signature = sacrebleu_bleu(["a"], [["a"]])[1]  # sacrebleu gives a signature only after a score
    return "|".join(field for field in signature.split("|") if not field.startswith("nrefs:"))
