"""The `study` command line: trial, sweep, resume, report, ui, server, spaces validate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from study.config import ConfigError
from study.console import SafeConsole
from study.records import REPORT_OUTCOME

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Which attention design choices make a model generalize and stay robust?")
spaces_app = typer.Typer(no_args_is_help=True, help="Search-space files.")
app.add_typer(spaces_app, name="spaces")
console = SafeConsole(stderr=True)  # masks a URI's password


def fail(msg: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the exit to raise (bad input exits 2)."""
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def trial(
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of config fields.")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value override, repeated once per key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train one configuration and print its final metrics."""
    from study.config import load_config
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        raise fail(str(e)) from None
    import torch
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise fail("device: cuda, but no CUDA device is visible on this machine; set "
                   "device=auto (the GPU where there is one) or device=cpu")
    from study.device import keep_freed_memory
    from study.tasks import get_task
    from study.train import run_trial
    keep_freed_memory()
    try:
        data = get_task(cfg)
    except ConfigError as e:
        raise fail(str(e)) from None
    last = None
    for last in run_trial(cfg, data):
        if not as_json:
            console.print(f"epoch {last.epoch}/{cfg.epochs}  " + "  ".join(
                f"{k} {last.metrics[k]:.4f}" for k in ("train_loss", "val_acc", "test_acc")
                if k in last.metrics), highlight=False)
    assert last is not None
    out: dict = dict(last.metrics)
    if last.diverged:
        out[REPORT_OUTCOME] = last.diverged
    if as_json:
        out["config"] = cfg.to_dict()
        print(json.dumps(out))
    else:
        table = Table(title=f"trial: task={cfg.task} seed={cfg.seed}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in out.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)
    if last.diverged:
        raise typer.Exit(1)


def _check_sweep_flags(name: str | None, trials: int | None, epochs: int | None,
                       gpu: float | None, max_concurrent: int | None) -> None:
    """The sweep's flags on their own, before the space file is read: one-line SpaceError."""
    from study.preflight import check_overrides
    from study.spaces import check_name
    if name is not None:
        check_name(name, "--name")
    check_overrides({"num_trials": trials, "epochs": epochs, "gpu": gpu,
                     "max_concurrent": max_concurrent})


@app.command()
def sweep(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file.")],
    name: Annotated[str | None, typer.Option(help="Study name (default: the space's name).")
                    ] = None,
    trials: Annotated[int | None, typer.Option(help="Override num_trials.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: auto or ray://HOST:PORT (default: start a local Ray).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default sqlite:///mlflow.db).")] = None,
    storage: Annotated[Path | None, typer.Option(
        help="Ray experiment directory (default ./ray_results).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override budget.epochs.")] = None,
    gpu: Annotated[float | None, typer.Option(
        help="Override resources.gpu per trial (fractions share a GPU).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Override max_concurrent.")
                              ] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Ray's own output (its logs, the trials' output).")] = False,
) -> None:
    """Run a sweep over a search space with Ray Tune + Optuna + ASHA, tracked in MLflow."""
    from study.spaces import SpaceError, load_space
    try:
        _check_sweep_flags(name, trials, epochs, gpu, max_concurrent)
        parsed = load_space(space)  # bad files stop here, before Ray or MLflow start
        name = name or parsed.name
        from study.sweep import run_sweep
        summary = run_sweep(space, name, trials, address, tracking_uri, storage,
                            overrides={"epochs": epochs, "gpu": gpu,
                                       "max_concurrent": max_concurrent}, verbose=verbose)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Ray Tune took over Ctrl-C
        raise _interrupted(name, storage) from None
    except SpaceError as e:
        raise fail(str(e)) from None
    except RuntimeError as e:  # a SweepFault: the state could not be saved, the store failed
        raise _sweep_fault(e) from None
    _after_sweep(summary, storage)


@app.command()
def resume(
    name: Annotated[str, typer.Argument(help="The sweep's name.")],
    storage: Annotated[Path | None, typer.Option(help="Ray experiment directory.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Ray's own output (its logs, the trials' output).")] = False,
) -> None:
    """Continue an interrupted sweep with its searcher state restored."""
    from study.spaces import SpaceError, check_name
    from study.sweep import resume_sweep
    try:
        check_name(name, "NAME")  # a safe file name: NAME is a folder under --storage
        summary = resume_sweep(name, storage, tracking_uri, address, verbose=verbose)
    except KeyboardInterrupt:
        raise _interrupted(name, storage, new=False) from None
    except SpaceError as e:
        raise fail(str(e)) from None
    except RuntimeError as e:  # a SweepFault: a damaged state (exit 2) or a fault (exit 1)
        raise _sweep_fault(e) from None
    _after_sweep(summary, storage)


def _sweep_fault(e: RuntimeError) -> typer.Exit:
    """A `SweepFault` (study/sweep/lifecycle.py) as one line and its exit code; any other
    error goes on as it is."""
    from study.sweep.lifecycle import SweepFault
    if not isinstance(e, SweepFault):
        raise e
    return fail(str(e), e.exit_code)


def _resume_hint(name: str, storage: Path | None) -> str:
    return f"interrupted: continue with `study resume {name}" + (
        f" --storage {storage}`" if storage else "`")


def _interrupted(name: str | None, storage: Path | None, new: bool = True) -> typer.Exit:
    """Ctrl-C that reached the command (Ray Tune catches the first one while trials run, and
    the sweep ends through `_after_sweep`): one line, exit 130, no traceback. A `new` sweep
    stopped before Ray Tune's first save is discarded (`discard_unstarted`)."""
    from study.sweep.lifecycle import META, discard_unstarted, storage_dir
    exp_dir = storage_dir(storage) / (name or "")
    if name and (exp_dir / META).exists() and not (new and discard_unstarted(exp_dir)):
        console.print(_resume_hint(name, storage), highlight=False, soft_wrap=True)
    else:
        console.print("interrupted before any trial started: nothing to resume; the same "
                      "command starts the sweep again", highlight=False, soft_wrap=True)
    return typer.Exit(130)


def _after_sweep(summary: dict, storage: Path | None = None) -> None:
    uri = summary["tracking_uri"]
    # a tracking server serves its own UI; a store file is browsed with `study ui`
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    # MLflow 3's UI opens experiments on its GenAI view unless told the workflow type
    page = (f"{base}/#/experiments/{summary['experiment_id']}"
            "?workflowType=machine_learning" if summary.get("experiment_id") else base)
    from study.tracking import resolve_uri

    # `make ui` / `make report` read ./mlflow.db: offered only where that is this store
    make = uri == resolve_uri(None) and Path("Makefile").is_file()
    how = "" if served else (f"study ui --tracking-uri {uri}"
                             + ("  (or make ui)" if make else "") + ", then ")
    console.print(f"browse the trials: {how}open {page}", highlight=False, soft_wrap=True)
    report = f"study report --experiment {summary['name']} --tracking-uri {uri}"
    console.print("report with calls and intervals: "
                  + (f"make report  (or {report})" if make else report), highlight=False,
                  soft_wrap=True)
    if not summary["complete"]:
        console.print(_resume_hint(summary["name"], storage), highlight=False, soft_wrap=True)
        raise typer.Exit(130)


@app.command()
def report(
    experiment: Annotated[str | None, typer.Option(
        help="MLflow experiment (study name); default: the latest sweep.")] = None,
    run: Annotated[str | None, typer.Option(
        "--run", help="The sweep's parent run id (instead of --experiment).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default sqlite:///mlflow.db).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default reports/<experiment>/).")] = None,
) -> None:
    """Report each design choice's effect with seed noise and CIs: index.html, CSVs, figures."""
    if experiment and run:
        raise fail("--experiment and --run: pass one of them, not both")
    from analysis.load import ReportError, load_sweep
    from study.preflight import check_storage, check_tracking_uri
    from study.spaces import SpaceError
    from study.tracking import resolve_uri
    uri = resolve_uri(tracking_uri)
    try:  # before the store is opened (which would write MLflow's schema into a stray file)
        check_tracking_uri(uri, existing=True)
        if out is not None:
            check_storage(out, "--out")
    except SpaceError as e:
        raise fail(str(e)) from None
    try:
        sweep_ = load_sweep(uri, experiment=experiment, run_id=run)
        from analysis.report import write_report
        from analysis.summary import header
        console.print(f"{sweep_.experiment} (parent run {sweep_.parent_run_id}): "
                      f"{header(sweep_)}", highlight=False, soft_wrap=True)
        index = write_report(sweep_, out or Path("reports") / sweep_.experiment,
                             tracking_uri=uri)
    except ReportError as e:
        raise fail(str(e)) from None
    console.print(f"report logged to MLflow: parent run {sweep_.parent_run_id}, artifacts "
                  "report/", highlight=False, soft_wrap=True)
    typer.echo(str(index))


@app.command()
def ui(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Serve the MLflow UI over the same store (127.0.0.1 unless --host says otherwise)."""
    import os

    from study.preflight import check_tracking_uri
    from study.spaces import SpaceError
    from study.tracking import resolve_uri
    uri = resolve_uri(tracking_uri)
    try:  # (a new SQLite file is created: an empty store to browse)
        check_tracking_uri(uri)
    except SpaceError as e:
        raise fail(str(e)) from None
    console.print(f"MLflow UI on http://{host}:{port} over {uri}", highlight=False)
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port)]
    os.execv(sys.executable, args)


@app.command()
def server(
    dir_: Annotated[Path, typer.Option(
        "--dir", help="Holds PostgreSQL's pgdata/, its pgpass and the artifacts/.")
                    ] = Path(".tracking"),
    host: Annotated[str, typer.Option(help="Bind address of the MLflow server.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the MLflow server.")] = 5000,
    pg_port: Annotated[int, typer.Option(help="Port of PostgreSQL (on 127.0.0.1).")] = 5433,
    workers: Annotated[int, typer.Option(help="MLflow server worker processes.")] = 2,
) -> None:
    """Run an MLflow tracking server on a local PostgreSQL (scripts/pg-local) until Ctrl-C;
    sweeps log to it with --tracking-uri http://HOST:PORT."""
    from study.server import ServerError, serve
    try:
        rc = serve(dir_, host, port, pg_port, workers,
                   say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except ServerError as e:
        raise fail(str(e), code=1) from None
    if rc:
        raise typer.Exit(rc)


@spaces_app.command("validate")
def spaces_validate(
    files: Annotated[list[Path], typer.Argument(help="Search-space YAML file(s).")],
) -> None:
    """Check search-space files and print each parsed space."""
    from study.preflight import name_where
    from study.spaces import SpaceError, check_name, load_space
    for f in files:
        try:
            space = load_space(f)
            # the name `study sweep FILE` would use (without --name), checked as it checks it
            check_name(space.name, name_where(space, space.name, resume=False))
        except SpaceError as e:
            raise fail(str(e)) from None
        typer.echo(space.summary())


def _click_exceptions() -> Any:
    """The exception classes of the click Typer runs on (Typer >= 0.26 vendors its own)."""
    try:
        from typer._click import exceptions
    except ImportError:  # an older Typer on the click package
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def main() -> None:
    cx = _click_exceptions()
    try:
        rc = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except cx.UsageError as e:  # a bad flag or argument: one line, exit 2
        where = f"{e.ctx.command_path}: " if e.ctx else ""
        console.print(f"[bold red]error:[/] {escape(where + e.format_message())}; see "
                      f"--help", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a sweep: no traceback
        sys.exit(130)
    except ConfigError as e:  # bad input that surfaced late still gets one line and exit 2
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
