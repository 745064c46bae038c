"""Compression around distillation: structured pruning that really shrinks a model
(`prune`: channels of any torch model through torch-pruning's dependency graph;
`kdistill.models.prune_hf`: feed-forward neurons of transformer encoders)."""
