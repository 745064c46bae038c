"""`kdistill plan`: the memory and time of each stage of a recipe, before anything trains.

For every stage that trains a model (teacher, assistant, baseline, seqkd, distill, ...)
`plan` builds the stage's real models on the recipe's real data and reports:

- weights: the trained model's parameters (plus projectors trained with it) and the
  frozen teacher's (when the stage reads one), in their dtypes; buffers apart;
- gradients (one per trainable parameter, in its dtype) and optimizer state (AdamW and
  Adam: 2 states per parameter; SGD: 1 with momentum, 0 without);
- activations of one micro-batch (batch_size / grad_accum samples), *measured*: the
  bytes autograd saves for the backward pass in a forward + backward of the student on a
  real batch (saved-tensor hooks, each storage counted once, weights excluded), plus
  the model's output; and what the teacher hands to the loss (its logits, hidden
  states or top-k) and the largest layer input + output of its forward pass;
- language models: the loss's memory, chunked as the run computes it (kdistill.losses.lm_chunked
  and lm_cross_entropy at train.chunk_size) and naive (the (B, T, V) float32 tensors a full-logits loss
  holds), from LOSS_COPIES below;
- the teacher cache's size on disk: classifier logits (N × classes × dtype bytes, as
  kdistill.cache writes them) or a language model's top-k (bytes per token × tokens, as
  kdistill.cache.topk writes them);
- the time per optimizer step: the median of `steps` real training steps after one
  warm-up step;
- an estimated peak: weights + optimizer state + the largest of the step's phases

      teacher forward  accumulated grads + teacher's largest layer in + out
      forward + loss   accumulated grads + teacher output + activations + the larger
                       of the loss and the largest input + output of one of the
                       trained model's layers that autograd does not save
                       (classifiers; LayerTensors: nn.LSTM's output, for one)
      backward         teacher output + activations walked in reverse, each layer
                       with its output's and input's gradients, plus the parameter
                       gradients written by then (SavedTensors: measured where the
                       backward pass writes each; all of them with grad_accum > 1)
      optimizer step   gradients + the optimizer's temporaries

  ("accumulated grads" only with train.grad_accum > 1: the earlier micro-batches'),
  compared with the device's memory; when it does not fit, which recipe settings to
  change, by YAML path, and what each would give.

`plan(..., measure=True)` also measures the true peak of the same steps by a method
that shares nothing with the estimate: on CPU, torch.profiler's allocation events
(every tensor allocation and free of the CPU allocator, in time order; the peak of
their running sum from before the models are built); on CUDA,
torch.cuda.max_memory_allocated. Both count tensor memory, not the Python process
(interpreter, libraries, the data: shown apart).

Not planned: the evaluation passes between epochs, writing checkpoints, the teacher's
pass that fills a cache, seqkd's generation and on-policy sampling; several processes
(each one holds one share of a step). A run also keeps the trained teacher in memory
next to the distill stage's frozen copy, which the estimate does not count.

The package knows no task: each task's stages are built by its own module
(`kdistill.tasks.<task>.plan`, the `plan` entry of its row in `kdistill.tasks.TASKS`)
from the pieces here: `planner` (the `plan()` entry), `stage` (one stage: build, time,
probe, add up), `probes` (the measuring instruments), `sequence` (the chunked token
loss's memory and the probed micro-step of the tasks that use it), `estimate` (the
phases and the advice), `results` (the records and the constants) and `report` (the
text).
"""

from kdistill.plan.estimate import estimate_phases
from kdistill.plan.planner import available_memory, plan
from kdistill.plan.probes import SavedTensors, profiled_peak
from kdistill.plan.report import format_plan
from kdistill.plan.results import (
    LOSS_COPIES,
    OPTIMIZER_STATES,
    CacheSize,
    LossMemory,
    Plan,
    StagePlan,
)
from kdistill.plan.sequence import lm_loss_memory
from kdistill.plan.stage import measure_peak

__all__ = [
    "LOSS_COPIES",
    "OPTIMIZER_STATES",
    "CacheSize",
    "LossMemory",
    "Plan",
    "SavedTensors",
    "StagePlan",
    "available_memory",
    "estimate_phases",
    "format_plan",
    "lm_loss_memory",
    "measure_peak",
    "plan",
    "profiled_peak",
]
