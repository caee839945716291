"""The `dbkit` command line: run experiments, rebuild reports, pretrain the toy world, benchmark."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .toyworld import recipe

    out = Path(args.out)
    log_path = out.parent / f"{out.name}.log.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(d: dict) -> None:
        line = json.dumps(d)
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    overrides = json.loads(args.recipe) if args.recipe else {}
    info = recipe.pretrain(out, overrides, log=log, start_from=Path(args.start_from) if args.start_from else None)
    log({"phase": "done", **info})
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import paths, runner, runqueue

    cwd = Path.cwd()
    files = [paths.find_params(f) for f in args.params]  # before the move to the project root
    params, root = paths.enter_project(files[0])  # runs/, reports/, data/ belong to the project root
    reports = paths.absolute_from(args.reports, cwd, root) if args.reports else Path("reports")
    kw = {"notebooks_dir": paths.absolute_from(args.notebooks, cwd, root) if args.notebooks else None,
          "only": args.only, "progress": not args.no_progress}
    if len(files) > 1:  # a queue: finished ones are skipped, a failure does not stop the others
        names = [str(paths.absolute_from(f, cwd, root)) for f in files]
        outcomes = runqueue.run_queue(names, args.param, reports_root=reports, **kw)
        print(runqueue.summary(outcomes))
        return 1 if any(o.status == "failed" for o in outcomes) else 0
    # errors end in main(): NotebookFailed is printed by run_experiment, the others there
    out = runner.run_experiment(params, args.param, reports_root=reports, **kw)
    index = out / "index.html"
    print(f"report: {index if index.exists() else out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import compare

    a, b = compare.side(args.a), compare.side(args.b)
    diff = compare.differences(a, b)
    print(compare.as_text(a, b, diff))
    if args.html:
        print(compare.write_html(a, b, diff, Path(args.html)))
    return 0


def _enter_run_folder(rd: Path, given: str) -> bool:
    """Whether ``rd`` is a run folder (else say so); moves to its project root, where the
    relative paths in its params lead."""
    if not (rd / "params.yaml").is_file():
        print(f"error: {given}: not a run folder (no params.yaml): pass runs/<experiment>/<hash>", file=sys.stderr)
        return False
    if rd.parent.parent.name == "runs":
        os.chdir(rd.parent.parent.parent)
    return True


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """A run's final output measured on other evaluation seeds: one JSON line per seed."""
    from . import checkpoints, runs

    rd = Path(args.run_dir).resolve()
    if not _enter_run_folder(rd, args.run_dir):
        return 2
    exp = checkpoints.experiment_of(rd)
    with runs.lock_run(rd, "dbkit evaluate " + str(args.run_dir)):  # no trainer rewriting output/ meanwhile
        for rec in checkpoints.evaluate_output(exp, rd, args.seed):
            print(json.dumps(rec))
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    """Sample (and with --metrics, evaluate) every kept checkpoint of a run folder."""
    from . import checkpoints, metric_registry, runs, sample
    from .files import atomic_write_bytes

    rd = Path(args.run_dir).resolve()
    out = Path(args.out).resolve() if args.out else rd / "checkpoint_grid.png"
    if not _enter_run_folder(rd, args.run_dir):
        return 2
    exp = checkpoints.experiment_of(rd)
    seeds = args.seeds if args.seeds else list(exp.params["sample"]["seeds"])
    with runs.lock_run(rd, "dbkit checkpoints " + str(args.run_dir)):  # exporting a checkpoint writes into it
        grid = checkpoints.checkpoint_grid(exp, rd, args.prompt, seeds, scale=args.scale)
        atomic_write_bytes(out, sample.png_bytes(grid))
        print(out)
        if args.metrics:
            for rec in checkpoints.evaluate_checkpoints(exp, rd):
                print(json.dumps({k: rec[k] for k in ("step", *metric_registry.KEY_METRICS) if k in rec}))
            print(rd / checkpoints.CHECKPOINT_METRICS)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from . import runner

    print(runner.build_index(Path(args.reports or "reports")))
    return 0


def _cmd_check_report(args: argparse.Namespace) -> int:
    from . import runner

    html_path = Path(args.html)
    if not html_path.is_file():
        print(f"error: {html_path} not found", file=sys.stderr)
        return 2
    refs = runner.external_refs(html_path.read_text(encoding="utf-8"))
    for ref in refs:
        print(f"external reference: {ref}", file=sys.stderr)
    png = Path(args.out) if args.out else html_path.with_suffix(".png")
    try:
        png = runner.screenshot(html_path, png)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(png)
    if runner.is_blank(png):
        print("error: the page rendered blank", file=sys.stderr)
        return 1
    return 1 if refs else 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Data, captions and training without notebooks: what `accelerate launch` runs on
    several GPUs. The main process prepares files; every process then trains (DDP)."""
    import contextlib
    import shlex

    from accelerate import PartialState

    from . import paths, runner, runs, workflow

    state = PartialState()
    args.params = str(paths.enter_project(args.params)[0])  # runs/ and data/ belong to the project root
    exp, rd = workflow.open_experiment(args.params, args.p)
    command = shlex.join(["dbkit", "train", args.params, *(x for o in args.p for x in ("-p", o))])
    # the main process holds the run folder for the whole command; run_training's own lock passes through
    lock = runs.lock_run(rd, command) if state.is_main_process else contextlib.nullcontext()
    stage = "01_data"
    try:
        with lock:
            if state.is_main_process:
                runs.write_provenance(rd, exp, "data")
                workflow.prepare_data(exp, rd)
                stage = "02_captions"
                runs.write_provenance(rd, exp, "captions")
                workflow.prepare_captions(exp, rd)
            state.wait_for_everyone()
            stage = "03_train"
            out = workflow.run_training(exp, rd, progress=state.is_main_process)
    except KeyboardInterrupt:
        raise runner.RunStopped(runner.stopped_message(stage, rd, command)) from None
    if state.is_main_process:
        print(f"trained: {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, evidence

    load_at_start = evidence.load_average()  # before the bench's own work loads the machine
    if args.what == "base":
        result = bench.bench_base(args.model, n=args.n, card=args.card)
    elif args.what == "load":
        result = bench.bench_load(args.model)
    elif args.what == "trainer":
        from . import bench_trainer

        if not args.diffusers_script:
            print(bench_trainer.script_help())
            return 2
        result = bench_trainer.bench_trainer(Path(args.diffusers_script), args.torchvision_shim or None,
                                             subject=args.subject, steps=args.steps or 200,
                                             repeats=args.repeats)
    elif args.what == "threads":
        from . import bench_threads

        result = bench_threads.bench_threads(subject=args.subject, steps=args.steps or 300)
    else:
        result = bench.bench_dreambooth(args.subject, steps=args.steps or 1500, overrides=args.p)
    print(json.dumps(result, indent=2))
    if args.save:
        import shlex

        command = shlex.join(["dbkit", *getattr(args, "argv", ["bench", args.what])])
        rec = evidence.record(command, result, load_avg_start=load_at_start)
        path = evidence.save(rec, f"bench-{args.what}")
        if args.what == "base" and args.card:  # the card names its record, known only once saved
            bench.write_card(args.model, result, record=evidence.relative_name(path),
                             hardware=rec["hardware_summary"])
        print(f"record: {path}", file=sys.stderr)  # stdout stays the JSON alone
    return 0


def _explain(e: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for a failure a user can cause; None for a bug (let it raise)."""
    from . import runner
    from .config import ConfigError
    from .models import ModelError
    from .runs import RunDirError, describe_os_error

    if isinstance(e, runner.NotebookFailed):
        return 1, ""  # run_experiment printed the failing cell and where its page is
    if isinstance(e, runner.RunStopped):
        return 130, str(e)
    if isinstance(e, KeyboardInterrupt):
        return 130, "stopped (Ctrl-C) before any notebook ran; nothing was changed"
    if isinstance(e, (ConfigError, ModelError, RunDirError, runner.RunError)):
        return 2, f"error: {e}"
    if isinstance(e, OSError):
        return 1, f"error: {describe_os_error(e)}"
    if isinstance(e, ValueError):  # e.g. --only with a name that is no notebook
        return 2, f"error: {e}"
    if isinstance(e, Exception):
        return 1, (f"error: {type(e).__name__}: {' '.join(str(e).split())[:500]} (unexpected: `--debug` shows "
                   "where it happened)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command an evidence record names
    try:
        return args.func(args)
    except BaseException as e:  # one or two lines for the user; the traceback only with --debug
        explained = None if args.debug else _explain(e)
        if explained is None:
            raise
        code, message = explained
        if message:
            print(message, file=sys.stderr)
        return code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="dbkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = add("pretrain-toyworld", help="train the toy base model from scratch (fixed seed)")
    p.add_argument("--out", default="runs/pretrain-toyworld/base", help="output pipeline folder")
    p.add_argument("--recipe", default="", help='JSON overrides of the recipe, e.g. \'{"unet_steps": 100}\'')
    p.add_argument("--start-from", default="", help="a pipeline this recipe produced through phase 2 (e.g. "
                   "dbkit/toyworld/base): load it and run only phase 3 (continue_steps)")
    p.set_defaults(func=_cmd_pretrain)

    p = add("run", help="validate params, run the notebooks with papermill, write HTML reports")
    p.add_argument("params", nargs="+", help="params YAML, e.g. params/demo.yaml; several (params/notes/*.yaml) "
                   "run in order as a queue: already published ones are skipped, a failed one does not stop "
                   "the others, a summary ends it")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param (repeatable), e.g. -p train.lora.rank=32")
    p.add_argument("--only", nargs="+", action="extend", metavar="NOTEBOOK",
                   help="run only these notebooks, e.g. --only 03_train 05_report (they read earlier "
                        "notebooks' files from the run folder)")
    p.add_argument("--reports", default="", help="reports folder (default: reports/ in the project root)")
    p.add_argument("--notebooks", default="", help="notebooks folder (default: dbkit's own, wherever you run "
                                                   "dbkit from)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

    p = add("compare", help="what differs between two runs: params, metrics, grids side by side")
    p.add_argument("a", help="a run folder (runs/<experiment>/<hash>), a params file, or a committed report row "
                             "(reports/<experiment>[/<hash12>][#label]; no #label: the report's own run)")
    p.add_argument("b", help="the other run folder, params file or report row")
    p.add_argument("--html", default="", help="also write a self-contained page with both runs' grids side by side")
    p.set_defaults(func=_cmd_compare)

    p = add("checkpoints", help="a run's kept checkpoints side by side: rows = steps (then the final output), "
                                "columns = seeds, one prompt; --metrics also measures each checkpoint")
    p.add_argument("run_dir", help="a run folder, runs/<experiment>/<hash>")
    p.add_argument("--prompt", default="a {subject}", help="the prompt ({subject} and {class_noun} expand as in "
                                                           "params; default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds, one column each (default: sample.seeds)")
    p.add_argument("--scale", type=int, default=2, help="enlargement of small samples in the grid (default: 2)")
    p.add_argument("--out", default="", help="PNG path (default: <run_dir>/checkpoint_grid.png)")
    p.add_argument("--metrics", action="store_true", help="also evaluate each checkpoint as metrics.json does → "
                   "<run_dir>/checkpoint_metrics.jsonl (slow: the full evaluation per checkpoint; cached by step)")
    p.set_defaults(func=_cmd_checkpoints)

    p = add("evaluate", help="a run's final output measured as metrics.json is, on other evaluation seeds "
                             "(a hold-out check, no training)")
    p.add_argument("run_dir", help="a run folder, runs/<experiment>/<hash>")
    p.add_argument("--seed", nargs="+", type=int, required=True,
                   help="metrics.seed values to measure with (the run's own value reproduces its metrics.json)")
    p.set_defaults(func=_cmd_evaluate)

    p = add("report", help="rebuild reports/index.html from every experiment's summary.json")
    p.add_argument("--reports", default="reports", help="reports folder (default: reports)")
    p.set_defaults(func=_cmd_report)

    p = add("check-report", help="screenshot a report page in headless Chromium (offline) "
                                 "and check it is not blank and fetches nothing")
    p.add_argument("html", help="an HTML report, e.g. reports/demo/index.html")
    p.add_argument("--out", default="", help="PNG path (default: beside the HTML)")
    p.set_defaults(func=_cmd_check_report)
    p = add("train", help="prepare data/captions and train without notebooks (accelerate launch)")
    p.add_argument("params", help="experiment params file")
    p.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="params override")
    p.set_defaults(func=_cmd_train)

    p = add("bench", help="measure: base accuracy, load time, DreamBooth signature rate, trainer speed, "
            "trainings side by side")
    p.add_argument("what", choices=("base", "load", "dreambooth", "trainer", "threads"))
    p.add_argument("--model", default="toyworld", help="base model (toyworld or a local diffusers folder)")
    p.add_argument("--n", type=int, default=100, help="base: number of held-out captions")
    p.add_argument("--card", action="store_true", help="base: write the figures into the model's README.md")
    p.add_argument("--subject", default="eyed_heart", help="dreambooth: toy-world subject")
    p.add_argument("--steps", type=int, default=0, help="dreambooth: training steps (default 1500); trainer: "
                   "steps of each trainer (default 200); threads: steps of each process (default 300)")
    p.add_argument("--diffusers-script", default="", help="trainer: path to diffusers' "
                   "examples/dreambooth/train_dreambooth_lora.py (without it: how to get it)")
    p.add_argument("--torchvision-shim", default="", help="trainer: folder put first on the script's PYTHONPATH "
                   "holding a stand-in `torchvision` package, where no torchvision build is installed")
    p.add_argument("--repeats", type=int, default=1, help="trainer: pairs of runs, in turn (medians reported; "
                   "5 for a figure to quote on a shared machine)")
    p.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="dreambooth: params override")
    p.add_argument("--save", action="store_true", help="also write the printed figures as an evidence record, "
                   "benchmarks/bench-<what>-<UTC date>-<commit>.json (command, commit, hardware, load; see "
                   "dbkit/evidence.py): a figure quoted in README.md or docs/*.md needs one")
    p.set_defaults(func=_cmd_bench)
    return parser


if __name__ == "__main__":
    sys.exit(main())
