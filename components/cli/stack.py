"""`tandem up`, `tandem down`, `tandem status`."""

from __future__ import annotations

import argparse
import sys

from components.cli._output import add_json_flag, print_json, table
from components.settings import DataLocation, get_settings
from components.stack import manager
from components.stack.services import SERVICE_NAMES


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="start the stack and wait until every component is healthy")
    p.add_argument("--only", type=_names, help=f"comma-separated subset of: {','.join(SERVICE_NAMES)}")
    p.add_argument("--skip", type=_names, default=[], help="comma-separated components not to start")
    add_json_flag(p)
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", help="stop everything `tandem up` started")
    p.add_argument("--only", type=_names, help="comma-separated subset")
    add_json_flag(p)
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser(
        "status", help="show each component as up or down with its URL, and where the data Tandem reads is"
    )
    add_json_flag(p)
    p.set_defaults(func=cmd_status)


def _print_status(items: list[manager.ComponentStatus]) -> None:
    rows = [(i.name, i.state, i.url, i.pid or "", i.detail) for i in items]
    print(table(rows, ["component", "state", "url", "pid", "detail"]))


def cmd_up(args: argparse.Namespace) -> int:
    settings = get_settings()

    def event(name: str, msg: str) -> None:
        if not args.json:
            print(f"{name:<13} {msg}", file=sys.stderr, flush=True)

    items = manager.up(settings, only=args.only, skip=args.skip, on_event=event)
    if args.json:
        print_json(manager.status_json(items))
    else:
        _print_status(items)
        if any(i.name == "gateway" and i.state == "up" for i in items):
            from components.keys import client_secret, key_file

            # the client key travels in the URL fragment, which the browser never sends to the server
            key = client_secret(settings)
            playground = f"{settings.gateway_url}/" + (f"#key={key}" if key else "")
            print(f"\nPlayground: {playground}\nOpenAI base_url: {settings.gateway_url}/v1")
            gateways = [i.url for i in items if i.name.startswith("gateway") and i.state == "up"]
            if len(gateways) > 1:  # no balancer of ours: clients pick one (or put haproxy/nginx in front)
                print("Gateways: " + "  ".join(gateways))
            print(f"Keys: {key_file(settings)} (client and admin keys as name:secret; `tandem` commands use them)")
            print(f"Dashboards: {settings.gateway_url}/dashboards" + (f"#key={key}" if key else ""))
        airflow = next((i for i in items if i.name == "airflow" and i.state == "up"), None)
        if airflow:
            from components.stack.airflow import admin_login

            print(f"\nAirflow UI: {airflow.url}  ({admin_login(settings)})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = manager.down(get_settings(), only=args.only)
    if args.json:
        print_json({"stopped": stopped})
    else:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _print_data(locations: dict[str, DataLocation]) -> None:
    def exists(loc: DataLocation) -> str:
        return "not checked" if loc["exists"] is None else ("yes" if loc["exists"] else "no")

    rows = [(name, loc["path"] or "(off)", exists(loc)) for name, loc in locations.items()]
    print(table(rows, ["data", "path", "exists"]))


def cmd_status(args: argparse.Namespace) -> int:
    settings = get_settings()
    items = manager.status(settings)
    locations = settings.data_locations()
    if args.json:
        print_json({"components": manager.status_json(items), "data": locations})
    else:
        _print_status(items)
        print()
        _print_data(locations)
    return 0
