"""Read intermediate features of a model by module path, without changing the model.

A tap names a module by its dotted path in `model.named_modules()` ("layer3.1",
"encoder.layer.5") and which tensor to read: the module's output (default) or its
input. Forward hooks capture the tensors; the model is never rewritten and its
`forward` never changed. What a tap reads (`TapSpec.index`):

    output  a tensor                  -> that tensor
            a tuple or list           -> its first tensor element (top level only)
            an object with a tensor
            `last_hidden_state`       -> last_hidden_state (Hugging Face ModelOutput)
            another mapping/dataclass -> its first tensor value
            index=k                   -> element k (of a mapping: of its non-None values,
                                         as `ModelOutput.to_tuple()[k]`)
            index="name"              -> that key or attribute
    input   index=None                -> the first tensor positional argument, else the
                                         first tensor keyword argument
            index=k                   -> positional argument k
            index="name"              -> the argument of that name (keyword or positional)

Paths are relative to the unwrapped model: a model wrapped by DistributedDataParallel,
DataParallel-style wrappers or torch.compile (any module whose only child is named
`module` or `_orig_mod`) is unwrapped first, and a leading "module." in a path is
accepted and dropped, so the same recipe works with and without the wrapper.
(DataParallel itself runs replicas in threads and is not supported: use DDP.)

A module that runs several times in one forward pass (a shared module, or one
activation module applied after every layer) has no single feature to distill:
reading it raises an error naming the path and how often it ran. A tensor that a
later in-place operation changes (`ReLU(inplace=True)`, `out += identity`) no longer
holds the captured value: reading it raises, unless the tap asks for `clone=True`.

The modules of the package:

- `capture`: `TapSpec`, `tap_key` and `Taps`, the forward hooks that capture features;
- `paths`: module paths checked and unwrapped (`resolve_paths`), patterns expanded
  (`expand_layers`);
- `trace`: one dry forward pass: the tapped shapes (`dry_run`) and the module table
  of `kdistill inspect` (`module_tree`);
- `projectors`: `make_projector`, a learned map where student and teacher shapes differ;
- `layer_maps`: `layer_map`, which student layer learns from which teacher layer.
"""

from kdistill.taps.capture import Taps, TapSpec, tap_key
from kdistill.taps.layer_maps import layer_map
from kdistill.taps.paths import expand_layers, resolve_paths, unwrap
from kdistill.taps.projectors import FeatureProjector, make_projector
from kdistill.taps.trace import call_model, dry_run, module_tree

__all__ = [
    "FeatureProjector",
    "TapSpec",
    "Taps",
    "call_model",
    "dry_run",
    "expand_layers",
    "layer_map",
    "make_projector",
    "module_tree",
    "resolve_paths",
    "tap_key",
    "unwrap",
]
