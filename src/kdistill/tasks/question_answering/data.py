"""Question-answering data: SQuAD-format questions, read, checked and split by
article, and their windows for one tokenizer.

A paragraph longer than a window is read in several windows (`max_length` tokens,
question first, consecutive windows sharing `doc_stride` paragraph tokens), each with
the character offsets of its paragraph tokens. In training, a window's target is the
answer's first and last token when the whole answer is inside it, else the [CLS]
token (position 0: "not in this window"), as BERT's SQuAD recipe does. In decoding,
every window of a question proposes its best spans and the best score wins.

A transfer set (data.transfer) adds unlabelled question-paragraph pairs to the
distill stage's training windows: the training questions asked of other paragraphs
of their article, and the questions of a file. Their windows' targets are UNLABELLED,
so the span term skips them and the teacher's terms read them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.paths import candidates, resolve_data_root, resolve_user_file
from kdistill.data.text_batches import length_buckets
from kdistill.errors import DataError
from kdistill.recipe.question_answering import ArticleRange, QADataConfig, QATransferConfig

UNLABELLED = -1  # a transfer window's target: the teacher's scores only, no span term


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]  # the reference answers' texts (none: a transfer question)
    start: int  # the first answer's first character in the context (UNLABELLED: none)
    article: int

    @property
    def labelled(self) -> bool:
        return self.start != UNLABELLED


@dataclass
class Windows:
    """A split's windows for one tokenizer."""

    ids: list[torch.Tensor]  # (T_i,) token ids
    type_ids: list[torch.Tensor] | None  # (T_i,) the tokenizer's; None: the model takes none
    offsets: list[list[tuple[int, int] | None]]  # per token: its paragraph characters, or None
    question: torch.Tensor  # (N,) the question of each window
    # (N,) target start token (0: the answer is not in the window; UNLABELLED: a
    # transfer window, no target)
    start: torch.Tensor
    end: torch.Tensor  # (N,)
    pad_id: int

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(i) for i in self.ids], dtype=torch.int64)

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows_list = rows.tolist()
        width = max(len(self.ids[r]) for r in rows_list)
        ids = torch.full((len(rows_list), width), self.pad_id, dtype=torch.int64)
        types = torch.zeros((len(rows_list), width), dtype=torch.int64)
        mask = torch.zeros((len(rows_list), width), dtype=torch.int64)
        for i, r in enumerate(rows_list):
            n = len(self.ids[r])
            ids[i, :n], mask[i, :n] = self.ids[r], 1
            if self.type_ids is not None:
                types[i, :n] = self.type_ids[r]
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.type_ids is not None:
            batch["token_type_ids"] = types
        return batch


@dataclass
class QAData:
    train: list[Question]
    val: list[Question]
    test: list[Question]
    section: QADataConfig
    source: str
    transfer: list[Question] | None = None  # unlabelled pairs for the distill stage
    transfer_source: str = ""
    _windows: dict[tuple[str, str], Windows] = field(default_factory=dict, repr=False)
    _distill: QAData | None = field(default=None, repr=False)

    def split(self, name: str) -> list[Question]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def for_distill(self) -> QAData:
        """The data of a stage that learns from a teacher: the training questions, then
        the transfer pairs (a new object, one per run: its own windows of train)."""
        if not self.transfer:
            return self
        if self._distill is None:
            self._distill = QAData(
                self.train + self.transfer, self.val, self.test, self.section, self.source
            )
        return self._distill

    def windows(self, model: nn.Module, split: str) -> Windows:
        key = (str(model.kdistill_tokenizer_key), split)
        if key not in self._windows:
            self._windows[key] = make_windows(
                model.kdistill_tokenizer, self.split(split), self.section
            )
        return self._windows[key]

    def order(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        lengths = self.windows(model, "train").lengths
        batches = length_buckets(lengths, batch_size, generator, pool_batches=50)
        full = [b for b in batches if len(b) == batch_size]
        return torch.cat(full + [b for b in batches if len(b) < batch_size])

    def articles(self, split: str) -> list[int]:
        return sorted({q.article for q in self.split(split)})


def read_squad(path: Path, *, labelled: bool = True) -> list[list[Question]]:
    """The questions of a SQuAD v1.1 file, article by article. Refused, naming the
    question id: a question without an answer, an answer whose text is not the
    context's text at its answer_start. Not `labelled` (a transfer file): answers are
    neither needed nor read."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the SQuAD file {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DataError(
            f'{path} is not SQuAD-format JSON: expected {{"data": [{{"title", '
            '"paragraphs": [{"context", "qas": [...]}]}]}'
        )
    articles: list[list[Question]] = []
    for a, article in enumerate(raw["data"]):
        questions = []
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                if not labelled:
                    questions.append(
                        Question(str(qa["id"]), qa["question"].strip(), context, [], UNLABELLED, a)
                    )
                    continue
                answers = qa.get("answers") or []
                if not answers:
                    raise DataError(
                        f"{path}: question {qa.get('id')!r} has no answer; extractive QA here "
                        "is SQuAD v1.1 (every question answered in its paragraph). Remove "
                        "unanswerable questions (SQuAD 2.0) first"
                    )
                for answer in answers:
                    begin = answer["answer_start"]
                    found = context[begin : begin + len(answer["text"])]
                    if found != answer["text"]:
                        raise DataError(
                            f"{path}: question {qa['id']!r}: the answer {answer['text']!r} is "
                            f"not the context's text at answer_start {begin} ({found!r}); fix "
                            "answer_start (characters, counted from 0)"
                        )
                questions.append(
                    Question(
                        id=str(qa["id"]),
                        question=qa["question"].strip(),
                        context=context,
                        answers=[ans["text"] for ans in answers],
                        start=int(answers[0]["answer_start"]),
                        article=a,
                    )
                )
        articles.append(questions)
    return articles


def load_qa(section: QADataConfig, data_dir: str | Path | None) -> QAData:
    root, tried = resolve_data_root(data_dir)
    found = [c for c in candidates(section.path, root) if c.is_file()]
    if not found:
        raise DataError(
            f"data.path: no SQuAD file {section.path!r} (looked at "
            + ", ".join(str(c) for c in candidates(section.path, root or tried[0]))
            + "). The SQuAD v1.1 dev file is published at "
            "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json; put it under "
            "the data folder (--data-dir, else $KDISTILL_DATA) or give its path"
        )
    path = found[0]
    articles = read_squad(path)

    def pick(r: ArticleRange | None, limit: int | None, name: str) -> list[Question]:
        if r is None:
            return []
        if r.end >= len(articles):
            raise DataError(
                f"data.{name}: articles {r.start}-{r.end}, but {path} has {len(articles)} "
                f"articles (0-{len(articles) - 1})"
            )
        chosen = [q for a in articles[r.start : r.end + 1] for q in a]
        return chosen[:limit] if limit is not None else chosen

    data = QAData(
        pick(section.train, section.limit_train, "train"),
        pick(section.val, section.limit_val, "val"),
        pick(section.test, section.limit_test, "test"),
        section,
        str(path),
    )
    if section.transfer is not None:
        data.transfer, data.transfer_source = _transfer(
            section.transfer, data, articles[section.train.start : section.train.end + 1], root
        )
    return data


def _transfer(
    settings: QATransferConfig,
    data: QAData,
    train_articles: list[list[Question]],
    root: Path | None,
) -> tuple[list[Question], str]:
    """data.transfer's unlabelled pairs, and what they are, for the run's log."""
    pairs: list[Question] = []
    sources = []
    if settings.other_paragraphs:
        rng = random.Random(settings.seed)
        paragraphs = {  # each training article's paragraphs, in order
            article[0].article: list(dict.fromkeys(q.context for q in article))
            for article in train_articles
            if article
        }
        for q in data.train:
            others = [p for p in paragraphs.get(q.article, []) if p != q.context]
            for k in sorted(
                rng.sample(range(len(others)), min(settings.other_paragraphs, len(others)))
            ):
                pairs.append(
                    Question(f"{q.id}~p{k}", q.question, others[k], [], UNLABELLED, q.article)
                )
        sources.append(
            f"{len(pairs)} training questions asked of other paragraphs of their article"
        )
    if settings.file is not None:
        path = resolve_user_file(
            settings.file, root, field="data.transfer.file", source="squad",
            expects="a SQuAD-format JSON file of questions",
        )  # fmt: skip
        extra = [q for article in read_squad(path, labelled=False) for q in article]
        if not extra:
            raise DataError(f"data.transfer.file: {path} holds no questions")
        measured = {q.context for q in data.val + data.test}
        leaked = {q.context for q in extra} & measured
        if leaked:
            raise DataError(
                f"data.transfer.file: {len(leaked)} paragraphs of {path} are "
                "validation or test paragraphs of this recipe; the student would learn the "
                "teacher's answers on the questions it is measured on. Leave those articles "
                "out of the transfer file"
            )
        pairs.extend(extra)
        sources.append(f"{len(extra)} questions of {path}")
    return pairs, "; ".join(sources)


def make_windows(tokenizer: Any, questions: list[Question], section: QADataConfig) -> Windows:
    ids, types, offsets, owner, starts, ends = [], [], [], [], [], []
    for begin in range(0, len(questions), 256):
        chunk = questions[begin : begin + 256]
        texts = [_cut(tokenizer, q.question, section.max_question_length) for q in chunk]
        out = tokenizer(
            texts,
            [q.context for q in chunk],
            truncation="only_second",
            max_length=section.max_length,
            stride=section.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids="token_type_ids" in tokenizer.model_input_names,
        )
        for w in range(len(out["input_ids"])):
            q = chunk[out["overflow_to_sample_mapping"][w]]
            sequence = out.sequence_ids(w)
            spans = [
                tuple(span) if sequence[t] == 1 else None
                for t, span in enumerate(out["offset_mapping"][w])
            ]
            start = end = 0 if q.labelled else UNLABELLED
            inside = [t for t, s in enumerate(spans) if s is not None]
            if q.labelled and inside:
                first_char, last_char = q.start, q.start + len(q.answers[0])
                low, high = spans[inside[0]], spans[inside[-1]]
                assert low is not None and high is not None
                if low[0] <= first_char and high[1] >= last_char:
                    start = next(t for t in inside if spans[t][1] > first_char)  # type: ignore[index]
                    end = next(t for t in reversed(inside) if spans[t][0] < last_char)  # type: ignore[index]
            ids.append(torch.tensor(out["input_ids"][w], dtype=torch.int64))
            if "token_type_ids" in out:
                types.append(torch.tensor(out["token_type_ids"][w], dtype=torch.int64))
            offsets.append(spans)
            owner.append(begin + out["overflow_to_sample_mapping"][w])
            starts.append(start)
            ends.append(end)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Windows(
        ids,
        types if len(types) == len(ids) else None,
        offsets,
        torch.tensor(owner),
        torch.tensor(starts),
        torch.tensor(ends),
        pad,
    )


def _cut(tokenizer: Any, question: str, limit: int) -> str:
    """The question, cut to `limit` tokens when longer (rare in SQuAD)."""
    pieces = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(pieces["input_ids"]) <= limit:
        return question
    return question[: pieces["offset_mapping"][limit - 1][1]]
