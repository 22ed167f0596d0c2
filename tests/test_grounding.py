"""Grounded captions and questions (ringmoe/data/grounding.py): every stated fact checked against
hand-made label maps whose truth is known by construction."""
import numpy as np
import pytest

from ringmoe.data.synthetic import LABEL_NAMES
from ringmoe.data import grounding

WATER, FOREST, CROPLAND, GRASSLAND, URBAN = (LABEL_NAMES.index(n) for n in
                                             ("water", "forest", "cropland", "grassland", "urban"))


def river_through_forest():
    m = np.full((64, 64), FOREST, np.int32)
    m[:, 30:34] = WATER                      # 4 of 64 columns, edge to edge
    return m


def town_and_fields():
    m = np.full((64, 64), GRASSLAND, np.int32)
    m[:32, :32] = URBAN                      # the north-west quadrant
    m[40:50, 40:50] = CROPLAND               # two separate fields in the south-east
    m[52:60, 52:62] = CROPLAND
    return m


def test_facts_measure_composition_layout_and_objects():
    f = grounding.facts(river_through_forest(), LABEL_NAMES)
    assert f.shares == {"forest": 60 / 64, "water": 4 / 64} and f.dominant == "forest"
    assert f.counts == {"water bodies": 1, "fields": 0}
    assert f.river == "forest" and not f.urban
    g = grounding.facts(town_and_fields(), LABEL_NAMES)
    assert g.places["urban"] == "north-west" and g.urban and g.built_share == 0.25
    assert g.counts == {"water bodies": 0, "fields": 2} and g.river is None
    assert g.shares["cropland"] == pytest.approx((100 + 80) / 4096)
    centre = np.full((64, 64), GRASSLAND, np.int32)
    centre[20:44, 20:44] = FOREST
    assert grounding.facts(centre, LABEL_NAMES).places["forest"] == "centre"
    south = np.full((64, 64), GRASSLAND, np.int32)
    south[40:, :] = FOREST
    assert grounding.facts(south, LABEL_NAMES).places["forest"] == "south"


def test_captions_state_the_measured_facts_in_several_phrasings():
    f = grounding.facts(town_and_fields(), LABEL_NAMES)
    seen = set()
    for seed in range(12):
        parts = grounding.caption_parts(f, np.random.default_rng(seed))
        assert set(parts) == set(grounding.ASPECTS)
        assert "grassland" in parts["composition"].lower()
        assert "north-west" in parts["layout"]
        assert "2 fields" in parts["objects"] and "25 %" in parts["objects"]
        assert "no water bodies" in parts["objects"].lower()
        seen.add(parts["composition"])
    assert len(seen) == len(grounding.COMPOSITION)
    assert grounding.caption(f, np.random.default_rng(0)) == grounding.caption(f, np.random.default_rng(0))
    river = grounding.caption_parts(grounding.facts(river_through_forest(), LABEL_NAMES), np.random.default_rng(0))
    assert "river" in river["objects"] and "forest" in river["objects"] and "one water body" in river["objects"].lower()


def test_questions_have_exact_answers():
    qa = {q["question"]: q for q in grounding.questions(grounding.facts(town_and_fields(), LABEL_NAMES), LABEL_NAMES)}
    assert qa["Is there urban in the image?"]["answer"] == "yes"
    assert qa["Is there water in the image?"]["answer"] == "no"
    assert qa["Is there more urban than grassland?"]["answer"] == "no"
    assert qa["Is there more grassland than urban?"]["answer"] == "yes"
    assert qa["Is it a rural or an urban area?"]["answer"] == "urban"
    assert qa["How many fields are there?"]["answer"] == "2"
    assert qa["What is the most common land cover?"]["answer"] == "grassland"
    assert {q["type"] for q in qa.values()} == {"presence", "comparison", "rural_urban", "count", "majority"}


def test_bad_label_maps_are_refused():
    with pytest.raises(ValueError, match="no labelled pixel"):
        grounding.facts(np.zeros((8, 8), np.int32), LABEL_NAMES)
    with pytest.raises(ValueError, match="class id 12 has no name"):
        grounding.facts(np.full((8, 8), 12, np.int32), LABEL_NAMES)


def test_records_carry_grounded_text_through_the_shards(tmp_path):
    """Synthetic records with text: the scene is the same as without, the captions and questions
    survive encode/decode and the shards, and a malformed question is a RecordError."""
    from ringmoe.data import schema, synthetic
    plain = synthetic.make_record(0, 3, 32)
    with_text = synthetic.make_record(0, 3, 32, captions=3)
    np.testing.assert_array_equal(plain.label_map, with_text.label_map)
    assert schema.encode(plain) == schema.encode(synthetic.make_record(0, 3, 32))   # text-free bytes unchanged
    assert len(with_text.captions) == 3 and len(set(with_text.captions)) == 3
    truth = grounding.facts(with_text.label_map, LABEL_NAMES)
    majority = [q for q in with_text.questions if q["type"] == "majority"]
    assert majority == [{"type": "majority", "question": "What is the most common land cover?",
                         "answer": truth.dominant}]
    back = schema.decode(schema.encode(with_text), "test")
    assert back.captions == with_text.captions and back.questions == with_text.questions
    bad = schema.Record(**{**with_text.__dict__, "questions": ({"type": "count", "question": "How many?"},)})
    with pytest.raises(schema.RecordError, match="question 0 must be non-empty strings"):
        schema.validate(bad, "test")


def test_rsmoe_subtasks_and_their_token_arrays(tmp_path):
    """A labelled record gives one sub-task per caption aspect (wording redrawn each epoch, facts
    the same) and its questions; a converted record its stored captions; encoding pads the
    instruction on the left and ends the answer with the end token, counting what it cuts."""
    from ringmoe.data import schema, synthetic
    from ringmoe.text.tokenizer import train_tokenizer
    from ringmoe.vlm import examples
    record = synthetic.make_record(0, 5, 32)
    tasks = examples.subtasks(record, LABEL_NAMES, seed=0, epoch=0, index=5)
    assert [t.kind for t in tasks[:3]] == list(grounding.ASPECTS)
    assert {"presence", "rural_urban", "count", "majority"} <= {t.kind for t in tasks[3:]} <= {
        "presence", "comparison", "rural_urban", "count", "majority"}
    epochs = [examples.subtasks(record, LABEL_NAMES, seed=0, epoch=e, index=5) for e in range(6)]
    assert all([t.instruction for t in later] == [t.instruction for t in tasks] for later in epochs)
    assert len({later[0].answer for later in epochs}) > 1          # other wordings ...
    assert all("%" in later[0].answer or "dominated" in later[0].answer for later in epochs)   # ... same facts
    assert examples.subtasks(record, LABEL_NAMES, seed=0, epoch=0, index=5) == tasks
    converted = schema.Record("rsicd-1", record.modalities, captions=("two planes near a terminal .",),
                              questions=({"type": "presence", "question": "Is there a plane?", "answer": "yes"},))
    assert examples.subtasks(converted, LABEL_NAMES, 0, 0, 1) == [
        examples.SubTask("caption", examples.CAPTION["caption"], "two planes near a terminal ."),
        examples.SubTask("presence", "Is there a plane?", "yes")]
    texts = [t.instruction + " " + t.answer for t in tasks] * 5
    tokenizer = train_tokenizer(texts, vocab_size=300)
    encoded = examples.encode(tasks, tokenizer, instruction_length=24, answer_length=12, pad_id=0, end_id=2)
    first = tokenizer.encode(tasks[0].instruction).ids
    assert encoded.instruction[0, -len(first):].tolist() == first[-24:]
    assert encoded.instruction_valid[0].sum() == min(len(first), 24)
    answer = tokenizer.encode(tasks[0].answer).ids + [2]
    assert encoded.answer[0].tolist()[:min(len(answer), 12)] == answer[:12]
    assert encoded.truncated == sum(len(tokenizer.encode(t.instruction).ids) > 24
                                    or len(tokenizer.encode(t.answer).ids) + 1 > 12 for t in tasks)
