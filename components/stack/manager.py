"""`tandem up`, `down` and `status`: start the stack in order, all or nothing; stop only what Tandem started."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from components.errors import ServiceError
from components.settings import Settings
from components.stack import process
from components.stack.services import SERVICE_NAMES, SERVICES, Instance, Service, instances, is_up, pid_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # "up", "down", "not installed"
    url: str
    pid: int | None
    managed: bool
    detail: str = ""


def status(settings: Settings, names: Iterable[str] | None = None) -> list[ComponentStatus]:
    """The state of each component, without starting anything."""
    wanted = list(names) if names else SERVICE_NAMES
    out = []
    for svc in SERVICES:
        if svc.name not in wanted:
            continue
        missing = svc.missing(settings)
        for inst in instances(svc, settings):
            s = inst.settings
            if missing and (svc.managed(settings) or svc.name == "postgres"):
                out.append(ComponentStatus(inst.name, "not installed", svc.url(s), None, svc.managed(s), missing))
                continue
            state = "up" if is_up(svc, s) else "down"
            out.append(ComponentStatus(inst.name, state, svc.url(s), pid_of(inst.name, s), svc.managed(s)))
    return out


def status_json(items: list[ComponentStatus]) -> list[dict[str, object]]:
    return [asdict(item) for item in items]


def _start_postgres(settings: Settings) -> None:
    from components.db import migrate
    from components.db.postgres import database_url

    database_url(settings)  # starts the embedded server when that is the one configured
    applied = migrate(settings)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))


def _launch(inst: Instance) -> process.ProcessRecord:
    svc, settings = inst.service, inst.settings
    assert svc.command is not None
    port = svc.port(settings)
    if port and process.port_in_use(settings.host, port):
        raise ServiceError(
            f"port {port} on {settings.host} is already in use, so {inst.name} cannot start: stop what uses it "
            f"or set TANDEM_{svc.name.upper().replace('-', '_')}_PORT"
        )
    return process.start(inst.name, svc.command(settings), settings.run_dir, env=svc.env(settings))


def _wait(inst: Instance, record: process.ProcessRecord) -> None:
    svc, settings = inst.service, inst.settings
    process.wait_until(inst.name, lambda: is_up(svc, settings), record, svc.startup_timeout(settings))


def _ensure_keys(settings: Settings, on_event: Callable[[str, str], None]) -> None:
    """The local key file (client, admin and vLLM keys), made the first time; a one-line error if unusable."""
    from components.keys import ensure_key_file, gateway_keys, vllm_secret

    path, created = ensure_key_file(settings)
    gateway_keys(settings)  # configured keys checked before anything starts: a placeholder stops `up` here
    vllm_secret(settings)
    on_event("keys", f"{'generated' if created else 'using'} {path} (mode 0600)")


def up(
    settings: Settings,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    on_event: Callable[[str, str], None] = lambda name, msg: None,
) -> list[ComponentStatus]:
    """Start the wanted components in order and wait until each is healthy.

    All or nothing: when one fails, the components this call started are stopped again and the error says
    which one failed and why. Components already up (or not installed) are left as they are.
    """
    wanted = [n for n in (list(only) if only else SERVICE_NAMES) if n not in set(skip)]
    unknown = [n for n in wanted if n not in SERVICE_NAMES]
    if unknown:
        raise ServiceError(f"unknown component {unknown[0]!r}; expected one of {', '.join(SERVICE_NAMES)}")
    _ensure_keys(settings, on_event)
    started: list[str] = []
    try:
        for svc in SERVICES:
            if svc.name not in wanted:
                continue
            missing = svc.missing(settings)
            if missing:
                on_event(svc.name, f"not installed: {missing}")
                continue
            if svc.name == "postgres":  # the embedded server, or an external database: migrated either way
                was_up = is_up(svc, settings)
                if not svc.managed(settings) and not was_up:
                    raise ServiceError(f"{svc.name} at {svc.url(settings)} is not reachable")
                if svc.managed(settings) and not was_up:
                    started.append(svc.name)
                _start_postgres(settings)
                on_event(svc.name, f"{'external' if not svc.managed(settings) else 'up'}: {svc.url(settings)}")
                continue
            # Replicas of one component start together and are waited for together (vLLM loads for ~40 s each).
            launched: list[tuple[Instance, process.ProcessRecord, float]] = []
            for inst in instances(svc, settings):
                url = svc.url(inst.settings)
                if not svc.managed(settings):
                    state = "up" if is_up(svc, inst.settings) else "down"
                    on_event(inst.name, f"external, {state}: {url}")
                    if state == "down":
                        raise ServiceError(f"{inst.name} at {url} is not reachable")
                    continue
                if is_up(svc, inst.settings):
                    on_event(inst.name, f"already up: {url}")
                    continue
                on_event(inst.name, "starting")
                started.append(inst.name)
                launched.append((inst, _launch(inst), time.monotonic()))
            for inst, record, t0 in launched:
                _wait(inst, record)
                on_event(inst.name, f"up in {time.monotonic() - t0:.0f} s: {svc.url(inst.settings)}")
    except BaseException:
        for name in reversed(started):
            _stop(name, settings)
        raise
    return status(settings, wanted)


def _stop(name: str, settings: Settings) -> bool:
    if name == "postgres":
        from components.db.postgres import stop_embedded

        return stop_embedded(settings)
    return process.stop(settings.run_dir, name)


def started_instances(svc: Service, settings: Settings) -> list[str]:
    """Names of the instances of ``svc`` with a pid file: also replicas of a larger fleet than configured now."""
    pattern = re.compile(rf"{re.escape(svc.name)}(-\d+)?")
    found = [p.stem for p in settings.run_dir.glob(f"{svc.name}*.json") if pattern.fullmatch(p.stem)]
    return sorted(found, key=lambda n: (len(n), n), reverse=True)


def down(settings: Settings, only: Iterable[str] | None = None) -> list[str]:
    """Stop what `tandem up` started (in reverse order, every replica); returns the names stopped."""
    wanted = set(only) if only else set(SERVICE_NAMES)
    stopped = []
    for svc in reversed(SERVICES):
        if svc.name not in wanted or not svc.managed(settings):
            continue
        names = [svc.name] if svc.name == "postgres" else started_instances(svc, settings)
        stopped += [name for name in names if _stop(name, settings)]
    return stopped
