"""The recipe: one typed schema for YAML files, `--set` overrides and the Python API.

A recipe names the task, the data, the teacher, the student, the objective and the
training settings. `load_recipe` reads YAML with `safe_load`, applies `key=value`
overrides and validates the result against the union of the tasks' schemas,
discriminated by `task` (default classification), raising one `RecipeError` that lists
every problem with its YAML path, the bad value, what is allowed, and a "did you mean"
for misspelt keys.

- `recipe/common.py`: the sections every task shares (train, output, seeds) and checks;
- `recipe/classification.py`, `recipe/causal_lm.py`: one schema per task;
- `recipe/load.py`: reading, overrides, the union and the error messages.

The classification schema's names are exported here, as before the tasks had their own
modules; a task's other names are imported from its module.
"""

from kdistill.recipe.classification import (
    TEACHER_LOCATION,
    AssistantConfig,
    DataConfig,
    LossTerm,
    MemberConfig,
    ModelSpec,
    Recipe,
    Schedule,
    StageName,
    StudentConfig,
    TapSpec,
    TeacherConfig,
    TextAugmentConfig,
    TextConfig,
    TransferConfig,
    as_schedule,
)
from kdistill.recipe.common import (
    AugmentConfig,
    EarlyStoppingConfig,
    LRScheduleConfig,
    OptimizerConfig,
    OutputConfig,
    Precision,
    Strict,
    TrainConfig,
    raise_all,
)
from kdistill.recipe.load import (
    apply_overrides,
    explain_error,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_union,
    validate_recipe,
)

__all__ = [
    "TEACHER_LOCATION",
    "AssistantConfig",
    "AugmentConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "LRScheduleConfig",
    "LossTerm",
    "MemberConfig",
    "ModelSpec",
    "OptimizerConfig",
    "OutputConfig",
    "Precision",
    "Recipe",
    "Schedule",
    "StageName",
    "Strict",
    "StudentConfig",
    "TapSpec",
    "TeacherConfig",
    "TextAugmentConfig",
    "TextConfig",
    "TrainConfig",
    "TransferConfig",
    "apply_overrides",
    "as_schedule",
    "explain_error",
    "load_recipe",
    "parse_override",
    "raise_all",
    "read_yaml",
    "recipe_union",
    "validate_recipe",
]
