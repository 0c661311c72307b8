"""Caption metrics: BLEU-4 and class-word accuracy against references, distinct-n and self-BLEU for diversity.

Captions are compared as lower-case word and punctuation tokens ("leaning right," -> leaning, right, ",").

- BLEU-4: corpus BLEU (torchmetrics `bleu_score`, n_gram 4, no smoothing, the COCO-caption convention) of every
  generated caption against all reference captions of its image.
- class-word accuracy: the fraction of captions that name exactly one class, the right one (chance: 1 / classes).
- distinct-n: per image, distinct n-grams / all n-grams over its K captions, averaged over images (Div-n of diverse
  captioning papers; 1 = no n-gram repeats across the K captions).
- self-BLEU: per image, the smoothed sentence BLEU-4 (torchmetrics `smooth=True`, Lin & Och) of each of its K
  captions against the other K - 1, averaged (Zhu et al. 2018, Texygen); lower = more diverse, 1 = identical.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", caption.lower())


def _joined(caption: str) -> str:
    return " ".join(words(caption))


def bleu4(captions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    from torchmetrics.functional.text import bleu_score

    preds = [_joined(c) for c in captions]
    target = [[_joined(r) for r in refs] for refs in references]
    return float(bleu_score(preds, target, n_gram=4))


def class_word_accuracy(captions: Sequence[str], labels: Sequence[int], class_of: Callable[[str], Optional[int]]) -> float:
    hits = [class_of(c) == int(y) for c, y in zip(captions, labels)]
    return sum(hits) / max(1, len(hits))


def distinct_n(groups: Sequence[Sequence[str]], n: int) -> float:
    scores = []
    for group in groups:
        grams = [tuple(w[i:i + n]) for w in map(words, group) for i in range(len(w) - n + 1)]
        if grams:
            scores.append(len(set(grams)) / len(grams))
    return sum(scores) / max(1, len(scores))


def self_bleu(groups: Sequence[Sequence[str]]) -> Optional[float]:
    from torchmetrics.functional.text import bleu_score

    scores = []
    for group in groups:
        for k, caption in enumerate(group):
            others = [_joined(c) for j, c in enumerate(group) if j != k]
            if others:
                scores.append(float(bleu_score([_joined(caption)], [others], n_gram=4, smooth=True)))
    return sum(scores) / len(scores) if scores else None


def caption_report(groups: Sequence[Sequence[str]], references=None, labels=None, class_of=None) -> dict:
    """The `captioning` section of report.json: diversity always (K >= 2), reference metrics when given."""
    flat = [c for g in groups for c in g]
    out = {"images": len(groups), "captions_per_image": len(groups[0]) if groups else 0}
    if references is not None:
        out["bleu4"] = round(bleu4(flat, [refs for refs, g in zip(references, groups) for _ in g]), 4)
    if labels is not None and class_of is not None:
        out["class_word_accuracy"] = round(class_word_accuracy(flat, [y for y, g in zip(labels, groups) for _ in g],
                                                               class_of), 4)
    out["distinct_1"] = round(distinct_n(groups, 1), 4)
    out["distinct_2"] = round(distinct_n(groups, 2), 4)
    sb = self_bleu(groups)
    out["self_bleu"] = None if sb is None else round(sb, 4)
    return out
