"""Sequence-level knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge
Distillation", EMNLP): the teacher writes completions of a set of prompts, the student
learns them with next-token cross-entropy on the completion tokens only.

The recipe's `seqkd` section says where the prompts come from and how the teacher
writes (`kdistill.recipe.causal_lm.SeqKDConfig`):

    stages: [teacher, baseline, seqkd]
    seqkd:
      prompts: prompts.jsonl          # {"prompt": "..."} per line; default: the first
      generation:                     #   prefix_tokens tokens of the training sequences
        {max_new_tokens: 64, temperature: 1.0, top_k: 50, top_p: 0.95, num_per_prompt: 2, seed: 0}

The stage reads top to bottom:

    prompts = seqkd_prompts(cfg, data, data_dir)               # text, with a name each
    ids = check_prompts(prompts, ...)                          # teacher tokens; too long: error
    write_generations(folder, spec, teacher, ids, ...)         # once per run; reused after
    records = read_generations(folder, spec)                   # stale or damaged: error
    rows = seqkd_rows(records, student_tokenizer, seq_len)     # prompt tokens labelled -100

Everything passes through text: prompts are text, the teacher's tokens are decoded to
text, and the student re-tokenizes prompt and completion with its own tokenizer, so
teacher and student may use different tokenizers. A completion the teacher ended with
its end-of-text token ends with the student's (when its tokenizer has one), so the
student learns to stop there; one cut at max_new_tokens does not.

Folder (<run>/seqkd/generations, or seqkd.dir to share it between runs):
    generations.jsonl  one object per completion: prompt, completion, stop ("eos" or
                       "length"), prompt_index, copy
    manifest.json      what the generations depend on (teacher weights and tokenizer
                       fingerprints, sha256 of the prompts, generation settings, the
                       teacher's context) plus counts and the file's sha256. Generations
                       whose manifest matches are reused; others are refused as stale.

Each completion is sampled from numbers seeded by (generation.seed, prompt index, copy)
alone (`kdistill.tasks.causal_lm.generate`), so the text does not depend on how prompts are batched.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.data.lm_text import (
    IGNORE_INDEX,
    encode_texts,
    problem_list,
    prompt_completion_rows,
    read_prompts,
    tokenizer_fingerprint,
)
from kdistill.errors import CacheError, DataError
from kdistill.recipe.causal_lm import SeqKDConfig, SeqKDGeneration
from kdistill.tasks.causal_lm.data import LMData, data_files
from kdistill.tasks.causal_lm.generate import derived_seed, generate, row_uniforms
from kdistill.tasks.causal_lm.models import EOS_TOKEN, CausalLM

GENERATIONS = "generations.jsonl"
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class Prompts:
    """Prompt texts, each with a name for messages ("line 3", "training sequence 12")."""

    texts: list[str]
    names: list[str]
    source: str  # where they come from, for messages and the manifest

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class SeqKDRows:
    """Prompt/completion rows for `fit_lm`: train (N, seq_len + 1), whose [:, :-1] are the
    inputs, and labels (N, seq_len), -100 on prompt tokens and padding."""

    train: torch.Tensor
    labels: torch.Tensor
    info: dict[str, Any]


# --------------------------------------------------------------------------- prompts


def seqkd_prompts(cfg: SeqKDConfig, data: LMData, data_dir: str | Path | None) -> Prompts:
    """The prompts of seqkd.prompts, else the first prefix_tokens tokens of num_prompts
    training sequences, evenly spaced (all of them by default), decoded to text."""
    if cfg.prompts is not None:
        path = data_files([cfg.prompts], data_dir, where="seqkd.prompts")[0]
        numbers, texts = read_prompts(path, field=cfg.prompt_field)
        return Prompts(texts, [f"line {n}" for n in numbers], f"seqkd.prompts ({path})")
    count = len(data.train) if cfg.num_prompts is None else min(cfg.num_prompts, len(data.train))
    rows = torch.linspace(0, len(data.train) - 1, count).round().long().unique().tolist()
    texts = [
        data.tokenizer.decode(
            data.train[row, : cfg.prefix_tokens].tolist(), skip_special_tokens=False
        )
        for row in rows
    ]
    return Prompts(
        texts,
        [f"training sequence {row}" for row in rows],
        f"the first {cfg.prefix_tokens} tokens of {len(rows)} training sequences",
    )


def check_prompts(
    prompts: Prompts,
    *,
    teacher_tokenizer: Tokenizer,
    teacher_context: int,
    student_tokenizer: Tokenizer,
    seq_len: int,
) -> list[list[int]]:
    """Each prompt's teacher token ids; every prompt that does not fit is named in one
    DataError. The teacher must have room to write at least one token (fewer than
    teacher_context tokens); the student, at most seq_len tokens, must have room to
    learn one (a row holds seq_len + 1 tokens of prompt and completion)."""
    teacher_ids = encode_texts(teacher_tokenizer, prompts.texts)
    student_ids = encode_texts(student_tokenizer, prompts.texts)
    problems = []
    for name, t_ids, s_ids in zip(prompts.names, teacher_ids, student_ids):
        if len(t_ids) >= teacher_context:
            problems.append(
                f"{name}: {len(t_ids)} teacher tokens, the teacher reads at most "
                f"{teacher_context}, so it has no room to write"
            )
        elif len(s_ids) > seq_len:
            problems.append(
                f"{name}: {len(s_ids)} student tokens, more than data.seq_len = {seq_len}, "
                "so no completion token would be learned"
            )
    if problems:
        raise DataError(
            problem_list(
                f"{prompts.source}: {len(problems)} of {len(prompts.texts)} prompts are too "
                "long for the models' context",
                problems,
            )
            + ". Shorten or remove those prompts, or raise data.seq_len (and the models' "
            "n_positions / max_position_embeddings with it)"
        )
    return teacher_ids


def teacher_window(teacher: CausalLM, seq_len: int) -> int:
    """Tokens the teacher reads at most: its context, and no more than data.seq_len (a
    teacher trained here never saw later positions; the student learns no more)."""
    return min(teacher.context or seq_len, seq_len)


# ------------------------------------------------------------------------ generations


def generations_spec(
    prompts: Prompts,
    settings: SeqKDGeneration,
    *,
    teacher_fingerprint: str,
    teacher_tokenizer: Tokenizer,
    context: int,
) -> dict[str, Any]:
    """What the generations depend on: generations with another spec are stale."""
    return {
        "format": FORMAT,
        "teacher": teacher_fingerprint,
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "prompts": {"count": len(prompts.texts), "sha256": prompts.sha256},
        "generation": settings.model_dump(mode="json"),
        "context": context,
    }


def write_generations(
    folder: Path,
    spec: dict[str, Any],
    teacher: CausalLM,
    prompt_ids: list[list[int]],
    prompts: Prompts,
    settings: SeqKDGeneration,
    *,
    tokenizer: Tokenizer,
    vocab_size: int,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, Any]:
    """Write generations.jsonl and manifest.json in `folder`, unless generations of this
    spec are there already (then only verified: stale or damaged ones are refused).

    tokenizer: the teacher's, to decode what it writes; vocab_size: its size, the ids
    it may write. Prompts of one token length are batched (`batch_size` completions at
    a time), so no padding is involved.
    """
    if (folder / MANIFEST).is_file():
        read_generations(folder, spec)
        return {"folder": str(folder), "reused": True, "seconds": 0.0}
    started = time.perf_counter()
    context = spec["context"]
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        configured = getattr(teacher.hf.config, "eos_token_id", None)
        eos_id = configured if isinstance(configured, int) and configured < vocab_size else None
    jobs = [(i, copy) for i in range(len(prompt_ids)) for copy in range(settings.num_per_prompt)]
    by_length: dict[int, list[tuple[int, int]]] = {}
    for job in jobs:
        by_length.setdefault(len(prompt_ids[job[0]]), []).append(job)
    records: dict[tuple[int, int], dict[str, Any]] = {}
    teacher = teacher.to(device)
    for length, group in sorted(by_length.items()):
        new_tokens = min(settings.max_new_tokens, context - length)
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            batch = torch.tensor([prompt_ids[i] for i, _ in part], device=device)  # (b, P)
            uniforms = None
            if settings.temperature > 0:
                seeds = [derived_seed("seqkd", settings.seed, i, copy) for i, copy in part]
                uniforms = row_uniforms(seeds, new_tokens, device)
            out = generate(
                teacher,
                batch,
                settings,
                vocab_size=vocab_size,
                uniforms=uniforms,
                eos_id=eos_id,
                max_new_tokens=new_tokens,
            )
            for row, (i, copy) in enumerate(part):
                ended = bool(out.ended[row])
                written = int(out.new_tokens[row]) - int(ended)  # the end-of-text not included
                ids = out.tokens[row, length : length + written].tolist()
                records[(i, copy)] = {
                    "prompt": prompts.texts[i],
                    "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "stop": "eos" if ended else "length",
                    "prompt_index": i,
                    "copy": copy,
                }
    lines = [json.dumps(records[job], ensure_ascii=False) + "\n" for job in jobs]
    text = "".join(lines)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / GENERATIONS, text)
    stopped = {"eos": 0, "length": 0}
    for record in records.values():
        stopped[record["stop"]] += 1
    seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(
        folder / MANIFEST,
        {
            **spec,
            "complete": True,
            "prompt_source": prompts.source,
            "generations": len(lines),
            "stopped": stopped,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "seconds": seconds,
        },
    )
    return {"folder": str(folder), "reused": False, "seconds": seconds, "stopped": stopped}


def read_generations(folder: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of generations.jsonl, after checking that its manifest matches `spec`
    and that the file is the one the manifest describes (CacheError otherwise)."""
    again = f"Delete {folder} (or run with --overwrite) to write them again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        data = (folder / GENERATIONS).read_bytes()
    except (OSError, ValueError) as exc:
        raise CacheError(f"seqkd generations {folder} cannot be read ({exc}). {again}") from None
    mismatches = _differences(spec, manifest)
    if mismatches:
        raise CacheError(
            f"seqkd generations {folder} are stale: {'; '.join(mismatches)}. They were written "
            f"for another teacher, other prompts or other settings. {again}"
        )
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CacheError(
            f"seqkd generations {folder}: {GENERATIONS} does not match its manifest (its "
            f"sha256 differs: edited, truncated or damaged). {again}"
        )
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _differences(expected: Any, found: Any, where: str = "") -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return [f"{where or 'manifest'}: expected a mapping, found {found!r}"]
        out = []
        for key, value in expected.items():
            out += _differences(value, found.get(key), f"{where}.{key}" if where else key)
        return out
    if expected != found:
        return [f"{where}: expected {_short(expected)}, found {_short(found)}"]
    return []


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "…"
    return repr(value)


# ----------------------------------------------------------------------- student rows


def seqkd_rows(records: list[dict[str, Any]], tokenizer: Tokenizer, *, seq_len: int) -> SeqKDRows:
    """The generations as the student's training rows: prompt and completion tokenized
    separately with the student's tokenizer, its end-of-text token appended where the
    teacher stopped on its own, then `prompt_completion_rows` (labels -100 on the
    prompt and padding; completions too long for seq_len cut at the end). Completions
    with no token to learn (empty, and no end-of-text token) are left out."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    prompt_ids = encode_texts(tokenizer, [r["prompt"] for r in records])
    completion_ids = encode_texts(tokenizer, [r["completion"] for r in records])
    kept_prompts, kept_completions = [], []
    for record, prompt, completion in zip(records, prompt_ids, completion_ids):
        if record["stop"] == "eos" and eos_id is not None:
            completion = [*completion, eos_id]
        if completion and prompt:
            kept_prompts.append(prompt)
            kept_completions.append(completion)
    if not kept_prompts:
        raise DataError(
            f"the teacher wrote no completion text for any of the {len(records)} prompts; "
            "raise seqkd.generation.max_new_tokens or check the teacher"
        )
    rows = prompt_completion_rows(
        kept_prompts, kept_completions, max_length=seq_len, pad_id=eos_id or 0
    )
    pad = torch.full((len(rows), 1), eos_id or 0, dtype=torch.long)
    train = torch.cat([rows.input_ids, pad], dim=1)  # (N, seq_len + 1)
    info = {
        "rows": len(rows),
        "left_out": len(records) - len(kept_prompts),
        "completions_cut": rows.truncated_completions,
        "tokens_learned": int((rows.labels != IGNORE_INDEX).sum()),
    }
    return SeqKDRows(train, rows.labels, info)
