"""`python -m pipelines`: run a visionops flow locally, or serve / register the deployments.

    python -m pipelines training --set train.epochs=5 --set distill.epochs=3   # what `make flow` runs
    python -m pipelines promotion
    python -m pipelines monitoring
    python -m pipelines drift                        # one window of the inference log; persistent drift retrains
    python -m pipelines serve                        # what `make schedule` runs (needs PREFECT_API_URL)
    python -m pipelines deploy --work-pool visionops # register on a remote server for a process worker
    python -m pipelines stop                         # what `make prefect-stop` runs: serve, then the server

Flows run against PREFECT_API_URL when it is set, else on Prefect's ephemeral local server (its SQLite
database under PREFECT_HOME). A failed flow run prints its error and exits 1.

Nothing to do, no server: `training` with no overrides, no --refresh-data and no --exp-name, when
PREFECT_API_URL is unset, first asks `dvc status`; when every stage is up to date and (with promotion)
every challenger was already judged against the current champion, it says so and exits 0 without
starting Prefect's temporary server, since a flow run there would be recorded nowhere anyone looks.
With PREFECT_API_URL set (`make flow` sets it when `make prefect-ui` runs), the flow always runs, so
the run shows in the UI. --always-run runs the flow regardless.
"""

from __future__ import annotations

import argparse
import json
import sys


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"python -m pipelines: error: --set expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
        return p

    p = add("training", "run the training flow: one task per DVC stage, then promotion")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a param first, as `dvc exp run -S` (repeatable; e.g. train.epochs=5)")
    p.add_argument("--no-promote", dest="promote", action="store_false", help="skip the promotion step")
    p.add_argument("--refresh-data", action="store_true", help="force the download stage to fetch the source again")
    p.add_argument("--exp-name", default=None, help="also save the result as this named DVC experiment (dvc exp save)")
    p.add_argument("--always-run", action="store_true", help="run the flow even when there is nothing to do")
    add("promotion", "run the metric-gated promotion of teacher and student")
    p = add("monitoring", "evaluate the champion on the newest data; fail below monitor.min_score")
    p.add_argument("--no-refresh-data", dest="refresh_data", action="store_false",
                   help="do not fetch the source again: evaluate on the newest data the last run fetched")
    p = add("drift", "judge the newest inference-log window against the champion's reference; retrain on persistent drift")
    p.add_argument("--model", default=None, help="the registered model (default: params.yaml mlflow.teacher_model_name)")
    p.add_argument("--alias", default="champion", help="its version to watch (default: %(default)s)")
    add("serve", "serve the deployments (training/nightly, promotion/manual, monitoring/daily, drift/hourly)")
    p = add("deploy", "register the deployments on the server at PREFECT_API_URL")
    p.add_argument("--work-pool", default=None, help="the work pool whose workers run them (default: none, just register)")
    p = sub.add_parser("stop", help="stop the serve process, then the server, that make schedule / prefect-ui started")
    p.add_argument("--prefect-home", default=None, help="where their PID files are (default: $PREFECT_HOME)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from visionops.process_settings import no_analytics

    no_analytics()  # before Prefect, MLflow, DVC or GX is imported: none of them phones home
    if args.command == "stop":
        import os

        from pipelines.stop import stop_all

        home = args.prefect_home or os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
        for line in stop_all(home):
            print(line)
        return 0
    if args.command in ("serve", "deploy"):
        from pipelines import deployments

        if args.command == "serve":
            deployments.main(args.project_dir)
        else:
            for line in deployments.register(args.project_dir, args.work_pool):
                print(line)
        return 0

    if args.command == "training" and not (args.overrides or args.refresh_data or args.exp_name or args.always_run):
        from pipelines.nothing_to_do import nothing_to_do

        reason = nothing_to_do(args.project_dir, args.promote)
        if reason:
            print(reason)
            return 0

    from pipelines import flows

    if args.command == "training":
        state = flows.training(
            project_dir=args.project_dir, overrides=_overrides(args.overrides) or None, promote=args.promote,
            refresh_data=args.refresh_data, experiment_name=args.exp_name, return_state=True,
        )
    elif args.command == "promotion":
        state = flows.promotion(project_dir=args.project_dir, return_state=True)
    elif args.command == "drift":
        from pipelines.drift import drift

        state = drift(project_dir=args.project_dir, model_name=args.model, alias=args.alias, return_state=True)
    else:
        state = flows.monitoring(project_dir=args.project_dir, refresh_data=args.refresh_data, return_state=True)
    if not state.is_completed():
        print(f"{args.command} flow run {state.name}: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
