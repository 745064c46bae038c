"""Width and depth pruning of a GPT-2 language model into a smaller GPT-2, the way
Minitron does it (Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", 2024): rank by activations on calibration sequences, keep the
most important embedding channels, attention heads, MLP neurons and layers, copy the
surviving weights into a model of the smaller configuration, then distill from the
unpruned teacher.

Importance, from forward passes only (Minitron §2.2, activation-based):
- MLP neuron: mean |activation| after the nonlinearity, over every token;
- attention head: mean L2 norm of the head's output (before the output projection);
- embedding channel: mean |value| of every LayerNorm's output in that channel
  (both norms of every layer, and the final one), summed;
- layer (when `layers` is not given): block importance, the mean 1 − cos(input,
  output) of each block over tokens (Men et al., "ShortGPT", 2024); the least
  changing layers are removed.

Heads are kept whole, so the pruned model's head size is the teacher's: GPT-2 ties
the attention width to the embedding width, so `n_embd` / `n_head` must equal the
teacher's head size. Every layer keeps the same number of MLP neurons (one `n_inner`
in a GPT-2 config); each layer chooses its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ModelError


def prune_gpt2(
    teacher: Any,
    batches: Sequence[Tensor],
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_inner: int | None = None,
    layers: Sequence[int] | None = None,
    where: str = "prune",
) -> tuple[Any, dict[str, Any]]:
    """A new, smaller GPT-2 (a transformers GPT2LMHeadModel) holding the teacher's most
    important weights, and what was kept. `teacher`: a GPT2LMHeadModel (left as it is);
    batches: (B, T) token ids of training text. `n_inner` defaults to 4 × n_embd."""
    from transformers import GPT2LMHeadModel

    config = teacher.config
    if getattr(config, "model_type", None) != "gpt2":
        raise ModelError(
            f"{where}: width and depth pruning follows GPT-2's layout; the teacher is "
            f"{getattr(config, 'model_type', type(teacher).__name__)!r}. Build the student "
            "from its own config instead"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ModelError(
            f"{where}: this GPT-2 scales attention by 1 / layer index, so a kept layer would "
            "compute differently at its new index; prune a teacher without "
            "scale_attn_by_inverse_layer_idx"
        )
    teacher_inner = config.n_inner or 4 * config.n_embd
    head_dim = config.n_embd // config.n_head
    n_inner = n_inner or 4 * n_embd
    _check_sizes(
        where,
        n_layer=(n_layer, config.n_layer),
        n_embd=(n_embd, config.n_embd),
        n_head=(n_head, config.n_head),
        n_inner=(n_inner, teacher_inner),
    )
    if n_embd != n_head * head_dim:
        raise ModelError(
            f"{where}: heads are kept whole, {head_dim} wide as in the teacher, and GPT-2's "
            f"attention is as wide as its embedding, so n_embd must be n_head × {head_dim}: "
            f"with n_head {n_head}, n_embd {n_head * head_dim}"
        )
    if layers is not None:
        layers = list(layers)
        bad = [i for i in layers if not 0 <= i < config.n_layer]
        if bad or len(set(layers)) != len(layers) or len(layers) != n_layer:
            raise ModelError(
                f"{where}.layers: {n_layer} distinct indices of the teacher's "
                f"{config.n_layer} layers (0 to {config.n_layer - 1}); got {layers}"
            )
    scores = _activation_scores(teacher, batches)
    kept_layers = sorted(layers) if layers is not None else _top(scores["blocks"], n_layer)
    channels = _top(scores["channels"], n_embd)
    student_config = config.__class__.from_dict(
        {
            **config.to_dict(),
            "n_layer": n_layer,
            "n_embd": n_embd,
            "n_head": n_head,
            "n_inner": n_inner,
        }
    )
    student = GPT2LMHeadModel(student_config)
    heads = {i: _top(scores["heads"][i], n_head) for i in kept_layers}
    neurons = {i: _top(scores["neurons"][i], n_inner) for i in kept_layers}
    state = _sliced_state(teacher, kept_layers, channels, heads, neurons, head_dim)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if not tied:  # an output layer of its own: its columns are the kept channels
        state["lm_head.weight"] = teacher.lm_head.weight[:, channels].detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(
            f"{where}: the sliced weights do not fit the smaller GPT-2 (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); this transformers version lays GPT-2 out otherwise"
        )
    if tied:
        student.tie_weights()
    student.train(teacher.training)
    return student, {
        "layers": kept_layers,
        "channels": channels,
        "heads": {str(i): heads[i] for i in kept_layers},
        "sizes": {
            "n_layer": [config.n_layer, n_layer],
            "n_embd": [config.n_embd, n_embd],
            "n_head": [config.n_head, n_head],
            "n_inner": [teacher_inner, n_inner],
        },
        "params": [_count(teacher), _count(student)],
    }


def _check_sizes(where: str, **sizes: tuple[int, int]) -> None:
    for name, (value, teacher) in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= teacher:
            raise ModelError(
                f"{where}.{name}: between 1 and the teacher's {teacher} (pruning keeps a part "
                f"of it); got {value!r}"
            )
    if all(value == teacher for value, teacher in sizes.values()):
        raise ModelError(f"{where}: these sizes are the teacher's own; nothing would be pruned")


def _top(scores: Tensor, count: int) -> list[int]:
    """The indices of the `count` highest scores, in ascending order."""
    return sorted(scores.topk(count).indices.tolist())


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _activation_scores(model: Any, batches: Sequence[Tensor]) -> dict[str, Any]:
    """Per layer: neuron and head scores and block importance; per embedding channel:
    summed LayerNorm output magnitude. Means over every token of `batches`."""
    base = model.transformer
    blocks = list(base.h)
    head_dim = model.config.n_embd // model.config.n_head
    sums: dict[str, Any] = {
        "channels": torch.zeros(model.config.n_embd, dtype=torch.float64),
        "heads": [0.0] * len(blocks),
        "neurons": [0.0] * len(blocks),
        "blocks": torch.zeros(len(blocks), dtype=torch.float64),
    }
    tokens = 0
    handles = []

    def norm_output(module: nn.Module, inputs: Any, output: Tensor) -> None:
        sums["channels"] += output.detach().abs().double().sum(dim=(0, 1))

    def into_projection(kind: str, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().double()  # (B, T, width)
            heads = kind == "heads"  # a head's size: its output's norm; a neuron's: |output|
            units = x.reshape(*x.shape[:2], -1, head_dim).norm(dim=-1) if heads else x.abs()
            sums[kind][i] = sums[kind][i] + units.sum(dim=(0, 1))

        return hook

    def block_change(i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            before = inputs[0].detach().double()
            after = (output[0] if isinstance(output, tuple) else output).detach().double()
            cosine = nn.functional.cosine_similarity(before, after, dim=-1)
            sums["blocks"][i] += (1 - cosine).sum()

        return hook

    for i, block in enumerate(blocks):
        handles += [
            block.ln_1.register_forward_hook(norm_output),
            block.ln_2.register_forward_hook(norm_output),
            block.attn.c_proj.register_forward_pre_hook(into_projection("heads", i)),
            block.mlp.c_proj.register_forward_pre_hook(into_projection("neurons", i)),
            block.register_forward_hook(block_change(i)),
        ]
    handles.append(base.ln_f.register_forward_hook(norm_output))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            base(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ModelError("pruning needs at least one calibration sequence; the data gave none")
    return {
        "channels": sums["channels"] / tokens,
        "heads": [s / tokens for s in sums["heads"]],
        "neurons": [s / tokens for s in sums["neurons"]],
        "blocks": sums["blocks"] / tokens,
    }


def _sliced_state(
    teacher: Any,
    layers: list[int],
    channels: list[int],
    heads: dict[int, list[int]],
    neurons: dict[int, list[int]],
    head_dim: int,
) -> dict[str, Tensor]:
    """The teacher's weights cut to the kept parts, named as in the smaller GPT-2.
    GPT-2's Conv1D stores weights as (in, out)."""
    t = teacher.transformer
    h = torch.tensor(channels)
    width = teacher.config.n_embd
    state: dict[str, Tensor] = {
        "transformer.wte.weight": t.wte.weight[:, h],
        "transformer.wpe.weight": t.wpe.weight[:, h],
        "transformer.ln_f.weight": t.ln_f.weight[h],
        "transformer.ln_f.bias": t.ln_f.bias[h],
    }
    for new, old in enumerate(layers):
        block = t.h[old]
        prefix = f"transformer.h.{new}."
        dims = torch.tensor(
            [head * head_dim + j for head in heads[old] for j in range(head_dim)]
        )  # the kept heads' columns of q (and, offset, of k and v)
        qkv = torch.cat([dims + part * width for part in range(3)])
        inner = torch.tensor(neurons[old])
        state |= {
            prefix + "ln_1.weight": block.ln_1.weight[h],
            prefix + "ln_1.bias": block.ln_1.bias[h],
            prefix + "ln_2.weight": block.ln_2.weight[h],
            prefix + "ln_2.bias": block.ln_2.bias[h],
            prefix + "attn.c_attn.weight": block.attn.c_attn.weight[h][:, qkv],
            prefix + "attn.c_attn.bias": block.attn.c_attn.bias[qkv],
            prefix + "attn.c_proj.weight": block.attn.c_proj.weight[dims][:, h],
            prefix + "attn.c_proj.bias": block.attn.c_proj.bias[h],
            prefix + "mlp.c_fc.weight": block.mlp.c_fc.weight[h][:, inner],
            prefix + "mlp.c_fc.bias": block.mlp.c_fc.bias[inner],
            prefix + "mlp.c_proj.weight": block.mlp.c_proj.weight[inner][:, h],
            prefix + "mlp.c_proj.bias": block.mlp.c_proj.bias[h],
        }
    return {key: value.detach().clone().contiguous() for key, value in state.items()}
