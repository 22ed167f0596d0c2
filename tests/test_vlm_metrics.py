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


def test_question_only_bound_answers_each_question_with_its_most_frequent_answer():
    # "water?" is "no" 2 of 3 times, "forest?" "yes" 1 of 1, "urban?" "rural" 1 of 2 (a tie:
    # one of them is chosen, right once): 2 + 1 + 1 = 4 of 6; the question's case does not
    # make it another question.
    results = [("presence", "Is there water?", "no"), ("presence", "is there water?", "No"),
               ("presence", "Is there water?", "yes"), ("presence", "Is there forest?", "yes"),
               ("rural_urban", "Rural or urban?", "rural"), ("rural_urban", "Rural or urban?", "urban")]
    bound = metrics.question_only_bound(results)
    assert bound["overall"]["value"] == 4 / 6 and bound["overall"]["n_test"] == 6
    assert bound["by_type"]["presence"]["value"] == 3 / 4 and bound["by_type"]["rural_urban"]["value"] == 0.5
