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


# A sub-task's kind, by id: a caption (stored), an aspect, a question type; a converted set's own
# question types beyond these count as "other".
KINDS = ("caption", *grounding.ASPECTS, *grounding.QUESTION_TYPES, "other")


def kind_id(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else KINDS.index("other")


def text_shapes(count: int, instruction_length: int, answer_length: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-row shapes and dtypes of the text arrays a batch row carries (`TextTasks`); from a config:
    text_shapes(v.subtasks_per_image, v.instruction_length, v.answer_length) with v = config.vlm."""
    n, i, a = count, instruction_length, answer_length
    return {"instruction": ((n, i), "int32"), "instruction_valid": ((n, i), "bool"),
            "answer": ((n, a), "int32"), "answer_valid": ((n, a), "bool"), "kind": ((n,), "int32")}


class TextTasks:
    """The text part of a training element (called by the pipeline's `RecordTransform` on each
    decoded, cropped record): `count` sub-tasks drawn without replacement (repeated when the
    record has fewer) from `subtasks` of the record as the model sees it, i.e. from the label map
    after the crop and flips, so every sentence is true of the pixels served. Holds only
    picklable state (the tokenizer as its JSON text, built lazily in the worker that uses it).

    Out: {"instruction": int32 (N, I), "instruction_valid": bool (N, I), "answer": int32 (N, A),
          "answer_valid": bool (N, A), "kind": int32 (N,) (index into `KINDS`), "truncated": int}.
    """

    def __init__(self, tokenizer_json: str, names: tuple[str, ...], count: int, instruction_length: int,
                 answer_length: int, seed: int, *, pad_id: int, end_id: int):
        if count < 1:
            raise ValueError(f"vlm.subtasks_per_image must be >= 1, got {count}")
        self.tokenizer_json, self.names, self.count = tokenizer_json, tuple(names), int(count)
        self.lengths, self.seed = (int(instruction_length), int(answer_length)), int(seed)
        self.pad_id, self.end_id = int(pad_id), int(end_id)
        self._tokenizer = None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return text_shapes(self.count, *self.lengths)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, record, label_map, epoch: int, index: int) -> dict:
        """`record`'s sub-tasks with `label_map` (the served crop's) in place of its own."""
        seen = dataclasses.replace(record, label_map=label_map if record.label_map is not None else None)
        tasks = subtasks(seen, self.names, self.seed, epoch, index)
        if not tasks:
            raise ValueError("the record has neither a labelled pixel nor stored text")
        rng = np.random.default_rng([self.seed, 3, epoch, index])
        picked = rng.permutation(len(tasks))
        picked = np.resize(picked, self.count)          # repeats when fewer than `count`
        encoded = encode([tasks[i] for i in picked], self.tokenizer, *self.lengths, pad_id=self.pad_id,
                         end_id=self.end_id)
        return {"instruction": encoded.instruction, "instruction_valid": encoded.instruction_valid,
                "answer": encoded.answer, "answer_valid": encoded.answer_valid,
                "kind": np.array([kind_id(tasks[i].kind) for i in picked], np.int32),
                "truncated": encoded.truncated}
