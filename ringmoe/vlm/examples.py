"""RS-MoE's training examples: a record's sub-tasks (instruction, answer), and their token arrays.

Sub-tasks of one record:
  * a labelled record: one per caption aspect (`grounding.ASPECTS`), the answer that
    aspect's sentence in a phrasing drawn from (seed, epoch, record), so every epoch
    sees other wordings of the same facts; and every question of its label map;
  * a record with stored text (a converted captioning or VQA set): each caption
    under the general instruction, and each stored question.
`CAPTION` names the instructions; a caption at inference is the aspects' answers
in `grounding.ASPECTS` order.

`encode` turns sub-tasks into fixed-shape arrays for the jitted step: the
instruction LEFT-padded to `instruction_length` (its end touches the answer), the
answer RIGHT-padded to `answer_length` and ended by the end token; too long is cut
and counted, never a silent reshape.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ringmoe.data import grounding

CAPTION = {
    "composition": "Describe the land cover of the image and how much of it there is.",
    "layout": "Describe where each land cover lies in the image.",
    "objects": "Describe the water bodies, fields and built-up land in the image.",
    "caption": "Describe the image.",
}


@dataclasses.dataclass(frozen=True)
class SubTask:
    kind: str          # an aspect, "caption", or a question type
    instruction: str
    answer: str


def subtasks(record, names: tuple[str, ...], seed: int, epoch: int, index: int) -> list[SubTask]:
    """The sub-tasks of `record` (data set index `index`) in epoch `epoch` (see the module doc)."""
    out = []
    if record.label_map is not None and (record.label_map > 0).any():
        facts = grounding.facts(record.label_map, names)
        parts = grounding.caption_parts(facts, np.random.default_rng([seed, 2, epoch, index]))
        out += [SubTask(a, CAPTION[a], parts[a]) for a in grounding.ASPECTS]
        out += [SubTask(q["type"], q["question"], q["answer"]) for q in grounding.questions(facts, names)]
    else:
        out += [SubTask("caption", CAPTION["caption"], c) for c in record.captions]
    known = {(t.instruction, t.answer) for t in out}
    out += [SubTask(q["type"], q["question"], q["answer"]) for q in record.questions
            if (q["question"], q["answer"]) not in known]
    return out


@dataclasses.dataclass
class Encoded:
    instruction: np.ndarray        # (N, I) int32, left-padded
    instruction_valid: np.ndarray  # (N, I) bool
    answer: np.ndarray             # (N, A) int32, right-padded, end token after the text
    answer_valid: np.ndarray       # (N, A) bool
    truncated: int                 # sub-tasks whose instruction or answer was cut


def encode(tasks: list[SubTask], tokenizer, instruction_length: int, answer_length: int, *, pad_id: int,
           end_id: int) -> Encoded:
    """Token arrays of `tasks` (a `tokenizers.Tokenizer`)."""
    n = len(tasks)
    out = Encoded(np.full((n, instruction_length), pad_id, np.int32), np.zeros((n, instruction_length), bool),
                  np.full((n, answer_length), pad_id, np.int32), np.zeros((n, answer_length), bool), 0)
    for i, task in enumerate(tasks):
        instruction = tokenizer.encode(task.instruction).ids
        answer = tokenizer.encode(task.answer).ids + [end_id]
        out.truncated += len(instruction) > instruction_length or len(answer) > answer_length
        instruction, answer = instruction[-instruction_length:], answer[:answer_length]
        out.instruction[i, instruction_length - len(instruction):] = instruction
        out.instruction_valid[i, instruction_length - len(instruction):] = True
        out.answer[i, :len(answer)] = answer
        out.answer_valid[i, :len(answer)] = True
    return out
