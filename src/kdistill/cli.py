"""The `kdistill` command line. Each command calls the Python API function of the same name."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from kdistill import __version__
from kdistill.errors import KdistillError, RecipeError, write_failure

EXAMPLES = """examples:
  kdistill run recipes/mnist_quick.yaml
  kdistill run mnist_hinton --set train.epochs=5 --output-dir runs/try
  kdistill validate recipes/mnist_hinton.yaml
  kdistill plan shakespeare_gpt_small_from_gpt --measure
  kdistill report runs/mnist_quick
  kdistill eval runs/mnist_quick/distill/seed0
  kdistill tune mnist_quick --space space.yaml --trials 20
  kdistill compare runs/a runs/b runs/c --output compare.html
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

    _run_command(sub, common)
    _validate_command(sub, common)
    _plan_command(sub, common)
    _eval_command(sub, common)
    _export_command(sub, common)
    _cache_command(sub, common)
    _inspect_command(sub, common)
    _recipes_command(sub, common)
    _report_command(sub, common)
    _tune_command(sub, common)
    _compare_command(sub, common)
    return parser


def _run_command(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _validate_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("validate", parents=[common], help="check a recipe without running it")
    _add_recipe_args(p)
    _add_data_dir(p)


def _plan_command(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _export_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a stage's model as ONNX and INT8 ONNX, checked against PyTorch and timed",
    )
    p.add_argument("stage", help="a stage folder (runs/X/distill/seed0) or its model.safetensors")
    p.add_argument("--output", help="the export folder (default: <stage>/export)")
    p.add_argument("--overwrite", action="store_true", help="replace what the export folder holds")
    p.add_argument(
        "--int8",
        choices=["dynamic", "dynamic-per-channel", "static", "none"],
        default="dynamic",
        help="INT8 model: dynamic (no data), dynamic-per-channel (one weight scale per "
        "output channel), static (activation ranges from training data), or none "
        "(default dynamic)",
    )
    p.add_argument("--no-int8", action="store_true", help="the same as --int8 none")
    p.add_argument(
        "--threads", type=int, default=1, help="threads for the latency table (default 1)"
    )
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print export.json instead of a summary")


def _eval_command(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _cache_command(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _inspect_command(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _recipes_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
    p.add_argument(
        "--losses", action="store_true", help="list the loss functions a recipe may name"
    )


def _report_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        help="rebuild results.json, results.md, plots and report.html from a run folder",
    )
    p.add_argument("run_dir", help="a run folder")


# the machine's fault, not kdistill's: a full disk, a quota, a read-only or refused folder
_WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES}


def _compare_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compare", parents=[common], help="one HTML page comparing several finished runs"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", help="the page to write (default: compare.html)")


def _tune_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tune",
        parents=[common],
        help="search the distillation settings (Optuna); re-run the best on test once",
    )
    _add_recipe_args(p)
    p.add_argument("--trials", type=int, help="trials of the study (default: tune.trials)")
    p.add_argument(
        "--timeout", type=float, help="seconds after which this worker starts no new trial"
    )
    p.add_argument("--space", help="a YAML file with the tune section (space, sampler, ...)")
    p.add_argument("--output-dir", help="study folder (default: runs/<name>-tune)")
    _add_data_dir(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in the folder (or join it as another worker)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the study in the folder")
    p.add_argument(
        "--no-final", action="store_true", help="search only; do not re-run the best settings"
    )
    p.add_argument("--quiet", action="store_true", help="log lines only, no progress bars")


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
    except BrokenPipeError:
        # the reader went away (`kdistill recipes | head`): stop quietly, as Unix tools do;
        # stdout goes to devnull so that Python's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if args.debug or exc.errno not in _WRITE_ERRNOS:
            raise
        what, first = write_failure(exc)
        where = f" writing {exc.filename}" if exc.filename else ""
        message = Text("error: ", style="bold red") + Text(
            f"{what}{where}. Files written before it are kept (checkpoints, finished "
            f"stages). {first}, then run the same command again (with --resume for a run)."
        )
        console.print(message, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: checkpoints written so far are kept; use --resume")
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    """Call the API function of the command's name (kdistill.api) and print its result."""
    from kdistill import api
    from kdistill.tasks import task_of_checkpoint, task_of_recipe, task_of_run

    command = args.command
    if command in ("run", "cache") and args.output_dir:
        from kdistill.lock import check_free

        check_free(Path(args.output_dir))  # before torch is imported: refused at once
    if command in ("run", "validate", "cache"):
        recipe = api.validate(args.recipe, args.overrides, data_dir=args.data_dir)
        task = task_of_recipe(recipe)
    if command == "run":
        results = api.run(
            recipe,
            output_dir=args.output_dir,
            data_dir=args.data_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
        if results:
            task.function("print_table")(results, Console())
    elif command == "validate":
        console.print(
            f"{args.recipe}: valid {task.name} recipe {recipe.name!r} "
            f"(stages: {', '.join(recipe.stages)}; seeds: {recipe.seeds})"
        )
    elif command == "cache":
        info = api.cache(
            recipe, output_dir=args.output_dir, data_dir=args.data_dir, overwrite=args.overwrite
        )
        verb = "is up to date" if info["reused"] else "written"
        console.print(f"teacher cache {info['folder']} {verb}", soft_wrap=True)
    elif command == "plan":
        from kdistill.plan import format_plan

        planned = api.plan(
            args.recipe,
            args.overrides,
            data_dir=args.data_dir,
            steps=args.steps,
            measure=args.measure,
            stages=args.stages,
            console=console,
        )
        print(json.dumps(planned.to_json(), indent=2) if args.json else format_plan(planned))
    elif command == "eval":
        result = api.evaluate(
            args.checkpoint, data=args.data, model=args.model, data_dir=args.data_dir
        )
        from kdistill.stages import resolve_measurable

        summary = task_of_checkpoint(resolve_measurable(args.checkpoint)).function("eval_summary")
        print(json.dumps(result, indent=2) if args.json else summary(result))
    elif command == "export":
        record = api.export(
            args.stage,
            output=args.output,
            overwrite=args.overwrite,
            int8=None if args.no_int8 or args.int8 == "none" else args.int8,
            threads=args.threads,
            data_dir=args.data_dir,
        )
        from kdistill.stages import resolve_weights

        summary = task_of_checkpoint(resolve_weights(args.stage)).function("export_summary")
        print(json.dumps(record, indent=2) if args.json else summary(record))
    elif command == "inspect":
        print(
            api.inspect(
                args.model,
                role=args.role,
                input_shape=_input_shape(args.input_shape),
                num_classes=args.num_classes,
                args=_model_args(args.arg),
                depth=args.depth,
                data_dir=args.data_dir,
            )
        )
    elif command == "recipes":
        if args.losses:
            print(_losses_table())
            return 0
        from kdistill.recipes import describe

        for name, path in api.recipes().items():
            print(f"{name:24s} {describe(path)}")
    elif command == "tune":
        study = api.tune(
            args.recipe,
            args.overrides,
            trials=args.trials,
            timeout=args.timeout,
            space=args.space,
            output_dir=args.output_dir,
            data_dir=args.data_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            final=not args.no_final,
            quiet=args.quiet,
        )
        _print_study(study, console)
    elif command == "compare":
        console.print(f"wrote {api.compare(args.run_dirs, output=args.output)}")
    elif command == "report":
        results = api.report(args.run_dir)
        task_of_run(Path(args.run_dir)).function("print_table")(results, Console())
        console.print(f"wrote {Path(args.run_dir) / 'results.md'} and report.html")
    else:
        raise AssertionError(command)
    return 0


def _print_study(summary: dict[str, Any], console: Console) -> None:
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["trials"].items()))
    console.print(f"study {summary['study']}: {states}; {summary['left']} left", soft_wrap=True)
    for best in summary.get("best", []):
        values = ", ".join(f"{k} {v:.6g}" for k, v in best["values"].items())
        console.print(f"  trial {best['trial']}: {values}", soft_wrap=True)
    if "final" in summary:
        console.print(f"wrote {Path(summary['study']) / 'study.md'} and the final run's results")


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise RecipeError(
            f"--input-shape {text!r}: write sizes separated by commas, e.g. 3,32,32"
        ) from None


def _model_args(items: list[str]) -> dict[str, Any]:
    """`--arg KEY=VALUE` options, each value parsed as YAML."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--arg {item!r}: write KEY=VALUE, for example --arg width=2")
        options[key] = yaml.safe_load(value)
    return options


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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
