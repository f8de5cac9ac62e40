"""Scores: multiple choice by log-likelihood, generated answers after extraction, perplexity of texts.

Definitions follow lm-evaluation-harness: acc is argmax of the summed continuation log-likelihoods; acc_norm
divides each by the choice's length in characters (its `completion_len`; ties go to the first choice);
perplexity metrics use the text's words and UTF-8 bytes.
"""

from __future__ import annotations

import math
import re

import numpy as np

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def multiple_choice(logliks: list[float], choices: tuple[str, ...], gold: int) -> dict[str, float]:
    lls = np.asarray(logliks, np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lengths) == gold)}


def _number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def extract(text: str, how: str) -> str:
    """The answer inside a generation: gsm8k (`#### N`, else the last number), boxed (`\\boxed{...}`), number (the
    last number), letter (the first standalone A-Z), none (the stripped text)."""
    if how == "gsm8k":
        m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
        found = [m.group(1)] if m else _NUMBER.findall(text)[-1:]
        return _number(found[0]) if found else ""
    if how == "boxed":
        start = text.rfind("\\boxed{")
        if start < 0:
            return ""
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        return ""
    if how == "number":
        found = _NUMBER.findall(text)
        return _number(found[-1]) if found else ""
    if how == "letter":
        m = re.search(r"\b([A-Z])\b", text)
        return m.group(1) if m else ""
    return text.strip()


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased whitespace tokens (longest common subsequence)."""
    p, r = _normalize(prediction).split(), _normalize(reference).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        row = [0]
        for j, b in enumerate(r):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generation(text: str, answers: tuple[str, ...], metric: str, how: str) -> tuple[str, float]:
    """(extracted answer, score): the best score over the accepted answers."""
    answer = extract(text, how)
    if metric == "exact_match":
        golds = [_number(a) if how in ("gsm8k", "number") else a for a in answers]
        return answer, float(any(_normalize(answer) == _normalize(g) for g in golds))
    if metric == "regex_match":
        return answer, float(any(re.search(a, answer, re.IGNORECASE) for a in answers))
    if metric == "rouge_l":
        return answer, max(rouge_l(answer, a) for a in answers)
    raise AssertionError(metric)


def perplexity(total_loglik: float, texts_words: int, texts_bytes: int) -> dict[str, float]:
    return {"word_perplexity": math.exp(-total_loglik / texts_words),
            "byte_perplexity": math.exp(-total_loglik / texts_bytes),
            "bits_per_byte": -total_loglik / texts_bytes / math.log(2)}
