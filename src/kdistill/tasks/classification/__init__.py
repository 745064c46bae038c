"""The classification task: images, tables and texts into classes.

- `steps.py`: `ClassifierSteps`, what `fit` calls each step (batch, forward, loss);
- `pipeline.py`: `run` and the stage table (teacher, ensemble members, assistant,
  baseline, distill and its born-again generations);
- `measure.py`: what a finished stage measures, `kdistill eval` and `inspect`;
- `teacher_cache.py`: the teacher's logits cache and `kdistill cache`;
- `models.py`: building the recipe's models for its data.

- `report.py`: the results table, results.md, plots and the eval summary.

The recipe's schema is `kdistill.recipe.classification`.
"""
