"""The ``tsechod`` command: parse arguments, start up in order, pick the exit code.

``--stdio`` (stdio.py) takes one connection on fd 0/1 from a superserver instead:
block signals -> take fds 0 and 1 -> config -> logging -> serve it -> exit.

Startup order, so that every error reaches a terminal or the journal:
block signals -> load and validate config -> configure logging -> lock the pid
file -> bind the listeners -> detach (only with --daemon) -> write the pid file
-> drop privileges -> serve (which installs the signal handlers and unblocks).
This is the only module that chooses exit codes: 0 clean stop, 1 runtime
failure, 2 usage error (argparse's own), 78 config error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Final

from . import __version__, affinity, systemd
from .address import one_line
from .access import AccessRules, normalize_address
from .config import (KEYS, KEYS_BY_NAME, LISTENER_KEYS, LISTENER_TABLE, SECTIONS, Config, ConfigError,
                     find_config_path, load_config, load_config_with_sources)
from .daemonize import ParentOutcome, StartupReport, detach, refuse_under_systemd
from .logsetup import check_log_target, configure_logging, log_fds, log_file_stream, start_log_writer, stderr_is_journal
from .pidfile import PidFile, StartupError
from .privileges import drop_privileges
from .metrics import bind_metrics
from .server import THREAD_STACK_BYTES, ListenError, listen_error, match_inherited, open_servers
from .service import Service, SystemdReporter, block_signals
from .state import ServerState, load_listener_tls
from .stdio import serve_stdio, stdio_log_config, take_stdio
from .supervisor import Supervisor
from .tomlwriter import toml_value

logger = logging.getLogger("tsecho.cli")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_DENIED: Final = 1  # check-access: the address would be refused
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 78
# The FileDescriptorName= of a socket-activated metrics endpoint (docs/operations.md, Metrics).
METRICS_FD_NAME: Final = "metrics"

# Flag values as typed, by Config field; config.py parses them like environment values.
Overrides = Mapping[str, str | Sequence[str]]


class UsageError(Exception):
    """The command line asks for something that can't work here (exit 2)."""


class StartupFailed(Exception):
    """The detached daemon reported that it could not start (exit 1)."""


# Flags that override a config key: flag name -> Config field (config.KEYS says which keys have one).
OVERRIDE_FLAGS: Final = {key.flag_name: key.name for key in KEYS if key.flag_name}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsechod",
        description="Timestamp echo daemon: answers every line with the line behind a timestamp.",
        epilog="Settings: flag > TSECHOD_<KEY> environment > config file > default. See tsechod(8).",
    )
    parser.add_argument(
        "command", nargs="?", choices=("run", "check-config", "check-access"), default="run",
        help="run the daemon (default); check-config: print the effective config with each value's source; "
             "check-access ADDRESS: say whether [access] rules allow ADDRESS and which rule decided "
             "(exit 0 allowed, 1 denied)",
    )
    parser.add_argument("address", nargs="?", metavar="ADDRESS", help="for check-access: an IPv4 or IPv6 address")
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: $TSECHOD_CONFIG, else /etc/tsechod/tsechod.toml if it exists)")
    parser.add_argument("--daemon", action="store_true",
                        help="detach into the background (classic daemon; not under systemd)")
    parser.add_argument("--stdio", action="store_true",
                        help="serve one connection on fd 0/fd 1 and exit (inetd, xinetd, tcpserver, "
                             "systemd Accept=yes)")
    parser.add_argument("--version", action="version", version=f"tsechod {__version__}")
    group = parser.add_argument_group("config overrides")
    for key in KEYS:
        if key.flag_name is None:
            continue
        if key.name == "listen":
            group.add_argument(key.flag_name, dest=key.name, action="append", metavar="HOST:PORT",
                               help=f"{key.help}; repeat for several ([::1]:8009 for IPv6)")
        else:
            group.add_argument(key.flag_name, dest=key.name, metavar=_metavar(key.name, key.type), help=key.help)
    return parser


def _metavar(name: str, kind: str) -> str:
    if name.endswith("_s"):
        return "SECONDS"
    if kind == "path":
        return "PATH"
    return "N" if kind.startswith("integer") else name.split("_")[-1].upper()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.command == "check-access") != (args.address is not None):
        parser.error("check-access takes one ADDRESS (and only check-access takes one)")
    environ = os.environ
    overrides: Overrides = {field: value for field in OVERRIDE_FLAGS.values() if (value := getattr(args, field)) is not None}
    # Relative paths are the operator's working directory's, now: --daemon changes it to /,
    # and a reload parses these flags again.
    overrides = {field: os.path.abspath(value) if KEYS_BY_NAME[field].type == "path" and isinstance(value, str)
                 else value for field, value in overrides.items()}
    debug = environ.get("TSECHOD_DEBUG") == "1"
    try:
        if args.command == "check-config":
            return check_config(args.config, environ, overrides)
        if args.command == "check-access":
            return check_access(args.address, args.config, environ, overrides)
        if args.stdio:
            if args.daemon:
                raise UsageError("--stdio and --daemon exclude each other: --stdio serves one connection "
                                 "for a superserver, in the foreground")
            return run_stdio(args.config, environ, overrides)
        return run(args.config, environ, overrides, daemon=args.daemon)
    except ConfigError as err:
        if debug:
            raise
        report_fatal(err, environ)
        return EXIT_CONFIG
    except UsageError as err:
        report_fatal(err, environ)
        return EXIT_USAGE
    except (ListenError, StartupError, StartupFailed, OSError) as err:
        if debug:
            raise
        report_fatal(err, environ)
        return EXIT_FAILURE


def report_fatal(err: Exception, environ: Mapping[str, str]) -> None:
    """Say why tsechod can't run, in one line on stderr (at err priority in the journal)."""
    priority = "<3>" if stderr_is_journal(environ) else ""
    print(f"{priority}tsechod: {err}", file=sys.stderr)


def check_config(explicit: str | None, environ: Mapping[str, str], overrides: Overrides) -> int:
    path = find_config_path(explicit, environ)
    config, sources = load_config_with_sources(path, environ, overrides)
    tls = load_listener_tls(config)  # the certificates too: readable, key matches, not expired
    print(format_config(config, sources), end="")
    for server_tls in tls:
        for warning in server_tls.warnings if server_tls is not None else ():
            print(f"tsechod: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def check_access(address: str, explicit: str | None, environ: Mapping[str, str], overrides: Overrides) -> int:
    """Print the verdict of [access] rules for *address* and the rule that decided it; 0 allowed, 1 denied.

    The rate limit is not asked: it depends on the address's recent connections,
    which only the running daemon knows.
    """
    path = find_config_path(explicit, environ)
    config = load_config(path, environ, overrides)
    try:
        normal = normalize_address(address)
    except ValueError as err:
        raise UsageError(f"check-access: {err}") from None
    decision = AccessRules.parse(config.rules).check(normal)
    shown = f"{address} (as {normal})" if str(normal) != address else address
    print(f"{shown}: {decision}")
    return EXIT_OK if decision.allowed else EXIT_DENIED


def format_config(config: Config, sources: Mapping[str, str]) -> str:
    """Render *config* as TOML grouped by section, each key with its source in a comment.

    What ``tsechod check-config`` prints. Keys whose value is None are shown
    commented out. The result parses back (tomllib) to the same settings.
    """
    lines = ["# tsechod effective configuration; each comment says where the value came from"]
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key in KEYS:
            if key.section != section:
                continue
            value = getattr(config, key.name)
            source = one_line(sources.get(key.name, "default"))
            if value is None:
                lines.append(f"# {key.name} is not set  # {source}")
            elif key.name == "listen" and not value:
                lines.append(f"# listen is not used: the [[listener]] tables below say where  # {source}")
            else:
                lines.append(f"{key.name} = {toml_value(value, cut=False)}  # {source}")
    tables = config.listeners[len(config.listen):]
    for number, listener in enumerate(tables, 1):
        lines.append("")
        lines.append(f"[[{LISTENER_TABLE}]]  # #{number}")
        for lkey in LISTENER_KEYS:
            value = getattr(listener, lkey.name)
            source = one_line(sources.get(f"{LISTENER_TABLE} #{number} {lkey.name}", "default"))
            if value is None:
                lines.append(f"# {lkey.name} is not set  # {source}")
            else:
                lines.append(f"{lkey.name} = {toml_value(value, cut=False)}  # {source}")
    return "\n".join(lines) + "\n"


def run(explicit: str | None, environ: Mapping[str, str], overrides: Overrides, daemon: bool) -> int:
    """Start up in the documented order and serve until stopped; return the exit code."""
    # Until the handlers are installed, a SIGHUP or SIGUSR1 (default action: terminate)
    # sent as soon as the port accepts would kill us; pending, it is acted on once serving.
    block_signals()
    path = find_config_path(explicit, environ)

    def reload() -> Config:  # a syslog target without /dev/log: reload failed, old config kept
        return check_log_target(load_config(path, environ, overrides, reloading=True))

    config = check_log_target(load_config(path, environ, overrides))  # exit 78 if syslog can't work
    if daemon and (reason := refuse_under_systemd(environ)):
        raise UsageError(reason)
    try:
        configure_logging(config, environ)
    except OSError as err:
        raise OSError(f"cannot open log file {config.log_file}: {err.strerror or err}") from err
    raise_fd_limit()
    # Process-wide, set before any thread starts: every thread tsechod makes is shallow.
    threading.stack_size(THREAD_STACK_BYTES)
    with contextlib.ExitStack() as stack:
        pidfile = stack.enter_context(PidFile(config.pid_file)) if config.pid_file else None
        state = ServerState(config)  # loads each TLS listener's certificate: ConfigError if one is bad
        stack.callback(state.close)
        for tls in state.tls:
            for warning in tls.warnings if tls is not None else ():
                logger.warning("%s", warning)
        named = systemd.listen_fds_with_names(os.environ)
        # FileDescriptorName=metrics marks the metrics endpoint's socket; every other one serves echo.
        metrics_socket = next((sock for name, sock in named if name == METRICS_FD_NAME), None)
        inherited = match_inherited(config, [(name, sock) for name, sock in named if name != METRICS_FD_NAME])
        if metrics_socket is None and config.metrics_listen is not None:
            try:
                metrics_socket = bind_metrics(config.metrics_listen)
            except OSError as err:
                raise listen_error(config.metrics_listen, err, what="metrics_listen") from err
        if metrics_socket is not None:
            stack.callback(metrics_socket.close)
        servers = open_servers(config, state, inherited)
        for server in servers:
            stack.callback(server.server_close)
            listener = config.listeners[server.listener_index] if server.listener_index is not None else None
            logger.info("listening on %s%s%s", server.address, " (socket activation)" if inherited else "",
                        listener.describe() if listener is not None else "")
        startup: StartupReport | None = None
        if daemon:
            if config.log_target == "stderr":
                logger.warning("--daemon with log_target = \"stderr\": logs are discarded once detached; "
                               "set log_target = \"file\" or \"syslog\"")
            fds = [*(s.fileno() for s in servers), *log_fds(), *state.fds()]
            if metrics_socket is not None:
                fds.append(metrics_socket.fileno())
            outcome = detach(fds, log_file_stream(), pidfile=pidfile)
            if isinstance(outcome, ParentOutcome):  # the process the user started
                if not outcome.started:
                    raise StartupFailed(outcome.message or "the daemon failed to start")
                return EXIT_OK
            startup = outcome
        start_log_writer()  # detached (no thread may cross detach's fork); from here logging never blocks
        try:
            if pidfile is not None:
                pidfile.write()
            drop_privileges(config.user, config.group)
        except StartupError as err:
            if startup is not None:
                startup.failed(str(err))
            raise
        reporter = SystemdReporter(watchdog_s=systemd.watchdog_interval_s(environ),
                                   on_ready=startup.ready if startup is not None else None)
        if config.workers > 1:  # each worker pins itself (supervisor.py); the supervisor stays free
            return Supervisor(config, [(s.socket, s.listener_index) for s in servers], reload, reporter,
                              metrics_socket, tls=state.tls).run()
        # Before the acceptors and connection threads start: they inherit the pin (affinity.py says why).
        pin = affinity.pin_process(config.cpu_affinity)
        return Service(servers, state, reload, reporter, metrics_socket, pin=pin).run_until_stopped()


def run_stdio(explicit: str | None, environ: Mapping[str, str], overrides: Overrides) -> int:
    """``--stdio``: take fds 0 and 1 first (so nothing else writes to the peer), then config, logs, serve."""
    block_signals()
    stdio = take_stdio(environ)
    config = load_config(find_config_path(explicit, environ), environ, overrides)
    config = stdio_log_config(config, stdio)
    try:
        configure_logging(config, environ)
    except OSError as err:
        raise OSError(f"cannot open log file {config.log_file}: {err.strerror or err}") from err
    start_log_writer()  # as the daemon: a stuck log sink must not hold the connection or its exit
    return serve_stdio(config, stdio)


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: each connection costs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            logger.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, err)


if __name__ == "__main__":
    sys.exit(main())
