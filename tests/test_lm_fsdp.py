"""The language-model loss under FSDP: two CPU processes (gloo), FULL_SHARD, GPT-2 blocks
wrapped as their own units, against one process.

FSDP keeps a unit's parameters whole only while its forward (and backward) runs; the
output layer lives in the root unit and is a flat shard otherwise. kdistill's chunked
loss reads that layer, so the loop computes the loss inside the student's forward
(`CausalLM.forward(head_loss=...)`). This test runs exactly that call, the one
`fit` makes on a language model, and checks the summed loss and every gradient against one process;
it also checks that reading the head after the forward, the old way, meets a shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = r"""
import functools, json, os, sys
import torch, torch.distributed as dist, transformers
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from kdistill.tasks.causal_lm.models import CausalLM
from kdistill.tasks.causal_lm.steps import LMObjective, step_losses
from kdistill.recipe.causal_lm import LMLossTerm

def build(seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2,
        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return CausalLM(transformers.GPT2LMHeadModel(config))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(1)
sequences = torch.randint(0, 300, (4, 17))
teacher = build(7).eval()
objective = LMObjective.of([LMLossTerm(loss="cross_entropy", weight=0.5),
                            LMLossTerm(loss="jsd", weight=1.0, params={"beta": 0.5})])

def head_loss(inputs, labels):
    with torch.no_grad():
        hidden = teacher(inputs)
    signal = {"teacher_hidden": hidden, "teacher_head_weight": teacher.head_weight,
              "teacher_head_bias": teacher.head_bias}
    return functools.partial(step_losses, labels=labels, objective=objective, progress=0.0,
                             teacher=signal, vocab_size=300, chunk_size=16)

tokens = sequences[:, 1:].numel()
single = build(0)
loss, _ = single(sequences[:, :-1], head_loss=head_loss(sequences[:, :-1], sequences[:, 1:]))
(loss / tokens).backward()
expected = {name: p.grad for name, p in single.named_parameters()}

model = FSDP(build(0), auto_wrap_policy=ModuleWrapPolicy({GPT2Block}), use_orig_params=True,
             sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
mine = sequences[rank::world]
part, _ = model(mine[:, :-1], head_loss=head_loss(mine[:, :-1], mine[:, 1:]))
(part * world / tokens).backward()  # FSDP averages gradients over processes
head_shape = list(model.module.head_weight.shape)  # after forward: a flat shard
summed = part.detach().clone()
dist.all_reduce(summed)
worst = 0.0
with FSDP.summon_full_params(model, with_grads=True):
    for name, p in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "")
        worst = max(worst, float((p.grad - expected[name]).abs().max()))
if rank == 0:
    print(json.dumps({"single": float(loss), "fsdp": float(summed), "worst_grad": worst,
                      "head_shape_after_forward": head_shape}))
dist.barrier()  # both processes done with gloo before either tears it down
dist.destroy_process_group()
# Leave without the interpreter's teardown: on this CPU build, gloo's threads sometimes
# abort the process there ("terminate called without an active exception") after the
# results above are printed and the group is destroyed; what is tested is done by now.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29533", str(script)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fsdp"] == pytest.approx(result["single"], rel=1e-5)
    assert result["worst_grad"] < 1e-6
    assert len(result["head_shape_after_forward"]) == 1  # why the loss runs inside forward


def test_a_run_under_accelerate_fsdp_is_refused_before_training() -> None:
    """Weights and checkpoints are not FSDP-aware yet: a launch with an FSDP config must
    stop with the reason and the fix, not write shards that do not load."""
    from accelerate import DistributedType

    from kdistill.errors import TrainingError
    from kdistill.stages import refuse_fsdp

    with pytest.raises(TrainingError, match=r"uses FSDP.*Launch with DDP instead"):
        refuse_fsdp(DistributedType.FSDP)
    for allowed in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_fsdp(allowed)
