"""Captioning and VQA scores: the COCO caption metrics from `pycocoevalcap`, and VQA accuracy.

Captions: BLEU-1..4, METEOR, ROUGE-L and CIDEr, each the corpus score of the
`pycocoevalcap` scorers over (references, prediction) pairs, after its PTB
tokenizer (lower case, punctuation split off). The tokenizer and METEOR run on
Java (their jars ship with the package); without a `java` on PATH the text is
tokenised in Python the same way for the common cases, METEOR is absent, and
the result says both (`tokenizer`, `unavailable`). SPICE needs the Stanford
CoreNLP models, which the package downloads on first use; with no network it is
reported as unavailable, never as a number.

VQA: exact-match accuracy of the normalised answers (lower case, surrounding
space and a final full stop removed), overall and per question type, each with
its Wilson 95 % interval; beside it the question-only bound (`question_only_bound`),
what answering from the question's words alone can score on the same questions.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict

from ringmoe.eval.intervals import accuracy_result

SPICE_WHY = "SPICE needs the Stanford CoreNLP models, a download this tool does not make"


def _python_tokenize(text: str) -> str:
    """PTB-like: lower case, punctuation removed (as pycocoevalcap's tokenizer drops it)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(references: dict[str, list[str]], predictions: dict[str, str]) -> dict:
    """{"bleu_1".."bleu_4", "meteor", "rouge_l", "cider", "images", "tokenizer", "unavailable"}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    missing = sorted(set(references) ^ set(predictions))
    if missing:
        raise ValueError(f"references and predictions cover different images, e.g. {missing[:3]}")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images without a reference caption, e.g. {empty[:3]}")
    java = shutil.which("java") is not None
    unavailable = {"spice": SPICE_WHY}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenizer = PTBTokenizer()
        refs = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        preds = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    else:
        refs = {k: [_python_tokenize(c) for c in v] for k, v in references.items()}
        preds = {k: [_python_tokenize(predictions[k])] for k in references}
        unavailable["meteor"] = "METEOR runs on Java: no java on PATH"
    scores = {}
    bleu, _ = Bleu(4).compute_score(refs, preds)
    scores.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        scores["meteor"] = float(Meteor().compute_score(refs, preds)[0])
    scores["rouge_l"] = float(Rouge().compute_score(refs, preds)[0])
    scores["cider"] = float(Cider().compute_score(refs, preds)[0])
    return {**scores, "images": len(references), "tokenizer": "ptb (java)" if java else "python (no java)",
            "unavailable": unavailable}


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def vqa_accuracy(results: list[tuple[str, str, str]]) -> dict:
    """results: (question type, predicted answer, true answer). {"overall": accuracy_result,
    "by_type": {type: accuracy_result}}."""
    if not results:
        raise ValueError("no VQA results to score")
    by_type = defaultdict(list)
    for kind, predicted, truth in results:
        by_type[kind].append(normalise_answer(predicted) == normalise_answer(truth))
    every = [hit for hits in by_type.values() for hit in hits]
    return {"overall": accuracy_result(sum(every) / len(every), len(every)),
            "by_type": {k: accuracy_result(sum(v) / len(v), len(v)) for k, v in sorted(by_type.items())}}


def question_only_bound(results: list[tuple[str, str, str]]) -> dict:
    """results: (question type, question, true answer). `vqa_accuracy` of answering every
    distinct (normalised) question with its most frequent true answer among these results:
    the most an answerer that reads only the question, not the image, can score on them.
    An optimistic bound (it is fitted on the answers it scores); a model below it on a
    question type has not shown that it reads the image for that type."""
    answers = defaultdict(Counter)
    for _, question, truth in results:
        answers[normalise_answer(question)][normalise_answer(truth)] += 1
    best = {q: counts.most_common(1)[0][0] for q, counts in answers.items()}
    return vqa_accuracy([(kind, best[normalise_answer(q)], truth) for kind, q, truth in results])
