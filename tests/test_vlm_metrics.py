"""Captioning and VQA scores (ringmoe/vlm/metrics.py) on cases whose values are known."""
import pytest

from ringmoe.vlm import metrics

REFS = {"a": ["a river crosses the forest .", "the forest is crossed by a river ."],
        "b": ["an urban scene with two fields in the south-east .", "a town in the north-west ."]}


def test_identical_captions_score_the_top_of_every_scale_and_wrong_ones_lower():
    perfect = metrics.caption_scores(REFS, {"a": "a river crosses the forest .",
                                            "b": "an urban scene with two fields in the south-east ."})
    assert perfect["bleu_1"] == pytest.approx(1.0) and perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    wrong = metrics.caption_scores(REFS, {"a": "a desert with dunes .", "b": "snow covers the mountains ."})
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert wrong[key] < perfect[key], key
    assert perfect["images"] == 2 and "spice" in perfect["unavailable"]
    if perfect["tokenizer"].startswith("ptb"):
        assert perfect["meteor"] > wrong["meteor"]
    else:
        assert "meteor" in perfect["unavailable"]


def test_caption_scores_refuse_mismatched_sets():
    with pytest.raises(ValueError, match="different images"):
        metrics.caption_scores(REFS, {"a": "x"})


def test_vqa_accuracy_by_type_with_intervals():
    results = [("presence", "Yes", "yes"), ("presence", "no", "yes"), ("count", "2", "2"),
               ("majority", "forest.", "Forest")]
    scores = metrics.vqa_accuracy(results)
    assert scores["overall"]["value"] == 0.75 and scores["overall"]["n_test"] == 4
    assert scores["by_type"]["presence"]["value"] == 0.5 and scores["by_type"]["majority"]["value"] == 1.0
    low, high = scores["overall"]["ci"]
    assert 0.3 < low < 0.75 < high <= 1.0
