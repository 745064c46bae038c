"""The `kdistill` command line. Each command calls the Python API function of the same name."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from kdistill import __version__
from kdistill.errors import KdistillError, RecipeError

EXAMPLES = """examples:
  kdistill run recipes/mnist_quick.yaml
  kdistill run mnist_hinton --set train.epochs=5 --output-dir runs/try
  kdistill validate recipes/mnist_hinton.yaml
  kdistill plan shakespeare_gpt_small_from_gpt --measure
  kdistill report runs/mnist_quick
  kdistill eval runs/mnist_quick/distill/seed0
"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe",
        help="a recipe YAML file, or the name of a shipped recipe (see `kdistill recipes`)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=3 (repeatable; values parsed as YAML)",
    )


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="folder holding the datasets (default: $KDISTILL_DATA, else ~/.cache/kdistill/data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description="Distill a large trained model (teacher) into a small one (student), "
        "and compare teacher, student alone and distilled student on quality and cost.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # every command also takes --debug after its name; SUPPRESS keeps the top-level value
    # when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", parents=[common], help="run a recipe's stages and write the results table"
    )
    _add_recipe_args(p)
    p.add_argument("--output-dir", help="run folder (default: output.dir, else runs/<name>)")
    _add_data_dir(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an unfinished run from its last checkpoints"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what the output folder holds")
    p.add_argument("--quiet", action="store_true", help="log lines only, no progress bars")

    p = sub.add_parser("validate", parents=[common], help="check a recipe without running it")
    _add_recipe_args(p)

    p = sub.add_parser(
        "plan",
        parents=[common],
        help="memory and time of each stage, from a few real steps, before training",
    )
    _add_recipe_args(p)
    _add_data_dir(p)
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed optimizer steps per stage, after one warm-up step (default 3)",
    )
    p.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=None,
        metavar="STAGE",
        help="plan only this stage, e.g. --stage distill (repeatable; default: every stage)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run the steps again and measure their true peak memory, beside the estimate",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser(
        "eval", parents=[common], help="measure saved weights on a dataset's test split"
    )
    p.add_argument(
        "checkpoint",
        help="a stage folder (runs/X/distill/seed0), a run folder or a .safetensors file",
    )
    p.add_argument(
        "--data",
        help="SOURCE[:PATH], e.g. mnist or image_folder:my_images (default: the data it was trained on)",
    )
    p.add_argument(
        "--model",
        help="model zoo name or package.module:factory, when no model.json is beside the weights",
    )
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")

    p = sub.add_parser(
        "cache", parents=[common], help="run the recipe's trained teacher once and store its logits"
    )
    _add_recipe_args(p)
    p.add_argument(
        "--output-dir",
        help="run folder holding the teacher (default: output.dir, else runs/<name>)",
    )
    _add_data_dir(p)
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing cache")

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="print a model's modules with output shapes, to pick layers to tap",
    )
    p.add_argument(
        "model",
        help="a zoo name (resnet20), package.module:factory, or a recipe (.yaml) with --role",
    )
    p.add_argument(
        "--role",
        choices=["teacher", "student", "assistant"],
        default="student",
        help="with a recipe: which model to show (default: student)",
    )
    p.add_argument(
        "--input-shape",
        default="3,32,32",
        help="one sample's shape, comma-separated (default 3,32,32; a recipe's data decides)",
    )
    p.add_argument("--num-classes", type=int, default=10, help="classes (default 10)")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument of the model factory (YAML value), repeatable",
    )
    p.add_argument("--depth", type=int, default=None, help="show modules this deep at most")
    _add_data_dir(p)

    p = sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
    p.add_argument(
        "--losses", action="store_true", help="list the loss functions a recipe may name"
    )

    p = sub.add_parser(
        "report",
        parents=[common],
        help="rebuild results.json, results.md and plots from a run folder",
    )
    p.add_argument("run_dir", help="a run folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        return _dispatch(args, console)
    except KdistillError as exc:
        if args.debug:
            raise
        # Text, not markup: messages hold paths and lists like [teacher] that rich would eat
        message = Text("error: ", style="bold red") + Text(str(exc))
        console.print(message, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: checkpoints written so far are kept; use --resume")
        return 130
    except BrokenPipeError:
        # the reader went away (`kdistill recipes | head`): stop quietly, as Unix tools do;
        # stdout goes to devnull so that Python's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    import kdistill
    from kdistill.tasks import task_of_recipe, task_of_run

    if args.command == "run":
        recipe = kdistill.load_recipe(args.recipe, args.overrides)
        results = kdistill.distill(
            recipe,
            output_dir=args.output_dir,
            data_dir=args.data_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
        if results:
            task_of_recipe(recipe).function("print_table")(results, Console())
        return 0
    if args.command == "validate":
        recipe = kdistill.load_recipe(args.recipe, args.overrides)
        stages = ", ".join(recipe.stages)
        console.print(
            f"{args.recipe}: valid {task_of_recipe(recipe).name} recipe {recipe.name!r} "
            f"(stages: {stages}; seeds: {recipe.seeds})"
        )
        return 0
    if args.command == "plan":
        from kdistill.plan import format_plan, plan

        recipe = kdistill.load_recipe(args.recipe, args.overrides)
        planned = plan(
            recipe,
            data_dir=args.data_dir,
            steps=args.steps,
            measure=args.measure,
            stages=args.stages,
            console=console,
        )
        print(json.dumps(planned.to_json(), indent=2) if args.json else format_plan(planned))
        return 0
    if args.command == "eval":
        from kdistill.pipeline import evaluate_checkpoint
        from kdistill.recipe import DataConfig, ModelSpec

        data = None
        if args.data:
            source, _, path = args.data.partition(":")
            try:
                data = DataConfig(source=source, path=path or None, val_fraction=0.0)
            except Exception as exc:
                raise RecipeError(f"--data {args.data}: {exc}") from None
        model = ModelSpec(name=args.model) if args.model else None
        result = evaluate_checkpoint(
            args.checkpoint, data=data, data_dir=args.data_dir, model=model
        )
        if args.json:
            print(json.dumps(result, indent=2))
        elif result.get("task") == "causal_lm":
            val, cost = result["val"], result["cost"]
            print(
                f"{result['checkpoint']}: validation loss/token {val['loss']:.4f}, perplexity "
                f"{val['perplexity']:.2f}, {val['bpc']:.4f} bits/character over "
                f"{val['tokens']:,} tokens; {cost['params']:,} params, "
                f"{cost['flops_per_token']:,.0f} FLOPs/token, "
                f"{cost['latency_ms_per_token']:.3f} ms/token"
            )
        else:
            test, cost = result["test"], result["cost"]
            print(
                f"{result['checkpoint']}: test accuracy {100 * test['accuracy']:.2f}% "
                f"({test['errors']} errors), NLL {test['nll']:.4f}, ECE {test['ece']:.4f}; "
                f"{cost['params']:,} params, {cost['flops']:,} FLOPs/sample, "
                f"{cost['latency_ms']:.2f} ms per batch of {cost['batch_size']}"
                + (
                    f", {cost['latency_ms_single']:.2f} ms per sample alone"
                    if cost.get("latency_ms_single") is not None
                    else ""
                )
            )
        return 0
    if args.command == "cache":
        recipe = kdistill.load_recipe(args.recipe, args.overrides)
        info = task_of_recipe(recipe).function("cache")(
            recipe, output_dir=args.output_dir, data_dir=args.data_dir, overwrite=args.overwrite
        )
        verb = "is up to date" if info["reused"] else "written"
        console.print(f"teacher cache {info['folder']} {verb}", soft_wrap=True)
        return 0
    if args.command == "inspect":
        print(_inspect(args))
        return 0
    if args.command == "recipes":
        if args.losses:
            print(_losses_table())
            return 0
        from kdistill.recipes import describe, shipped

        for name, path in shipped().items():
            print(f"{name:24s} {describe(path)}")
        return 0
    if args.command == "report":
        task = task_of_run(Path(args.run_dir))
        results = task.function("write_report")(Path(args.run_dir))
        task.function("print_table")(results, Console())
        console.print(f"wrote {Path(args.run_dir) / 'results.md'}")
        return 0
    raise AssertionError(args.command)


def _losses_table() -> str:
    """Every loss a recipe may name, per task (the `objective` of each recipe kind)."""
    from kdistill.losses.divergences import DESCRIPTIONS
    from kdistill.losses.objective import LOSSES
    from kdistill.losses.table import LM_DIVERGENCES

    lines = ["classification (images, tables, text):"]
    for name, fn in sorted(LOSSES.items()):
        first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines.append(f"  {name:22s} {first}")
    lines.append("causal language modelling (task: causal_lm), per token, chunked:")
    lines.append(f"  {'cross_entropy':22s} next-token cross-entropy on the counted tokens")
    for name, kind in LM_DIVERGENCES.items():
        lines.append(f"  {name:22s} {DESCRIPTIONS[kind]}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> str:
    import torch
    import yaml

    from kdistill.models import build_model
    from kdistill.recipe import ModelSpec
    from kdistill.taps import module_tree

    if args.model.endswith((".yaml", ".yml")):
        from kdistill import load_recipe
        from kdistill.data import TextData
        from kdistill.data import build as build_data
        from kdistill.pipeline import make_model, sample_inputs, untrained_teacher_source
        from kdistill.recipe import Recipe

        recipe = load_recipe(args.model)
        section = getattr(recipe, args.role, None)
        if section is None:
            raise RecipeError(f"{args.model}: the recipe has no {args.role} section")
        if not isinstance(recipe, Recipe):
            return _inspect_causal_lm(recipe, section.model, args)
        spec = section.model
        data = build_data(recipe.data.model_copy(update={"limit_test": 1}), args.data_dir)
        if isinstance(data, TextData):
            # each text model brings its tokenizer; a student built from the teacher's
            # layers (`location: teacher`) has the same modules from an untrained one
            where = f"{args.role}.model"
            source = untrained_teacher_source(recipe, data, where)
            model = make_model(data, spec, where=where, teacher=source).eval()
            header = f"{spec.name}: text ({data.num_classes} classes), a batch of 8 sentences"
            sample = sample_inputs(data, model, "cpu")
            return header + "\n" + module_tree(model, sample, max_depth=args.depth)
        input_shape, num_classes = data.input_shape, data.num_classes
        sample = data.to_input(data.train.x[:2])
    else:
        options = {}
        for item in args.arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise RecipeError(f"--arg {item!r}: write KEY=VALUE, for example --arg width=2")
            options[key] = yaml.safe_load(value)
        spec = ModelSpec(name=args.model, args=options)
        try:
            input_shape = tuple(int(n) for n in args.input_shape.split(","))
        except ValueError:
            raise RecipeError(
                f"--input-shape {args.input_shape!r}: write sizes separated by commas, e.g. 3,32,32"
            ) from None
        num_classes = args.num_classes
        sample = torch.randn(2, *input_shape)
    model = build_model(spec, input_shape=input_shape, num_classes=num_classes, where="model")
    model.eval()
    header = f"{spec.name}: input {tuple(input_shape)}, {num_classes} classes"
    return header + "\n" + module_tree(model, sample, max_depth=args.depth)


def _inspect_causal_lm(recipe: Any, spec: Any, args: argparse.Namespace) -> str:
    """The modules of a language-model recipe's teacher or student, on two validation
    sequences of its data (the tokenizer trained in a scratch folder when the recipe
    trains one)."""
    import tempfile

    from kdistill.lm.data import build_lm_data
    from kdistill.taps import module_tree

    with tempfile.TemporaryDirectory() as scratch:
        data = build_lm_data(recipe.data, data_dir=args.data_dir, tokenizer_dir=Path(scratch))
    model = data.build_model(spec, f"{args.role}.model").eval()
    sample = data.val[:2, :-1]  # (2, seq_len) token ids
    header = (
        f"{args.role}: causal LM, vocabulary {data.vocab_size}, "
        f"input {tuple(sample.shape)} token ids"
    )
    return header + "\n" + module_tree(model, sample, max_depth=args.depth)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
