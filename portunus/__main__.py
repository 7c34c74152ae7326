"""Entry point: pick the role from argv[0] (busybox style) or the first argument."""

from __future__ import annotations

import os
import sys

from . import __version__

# exit codes from errors.py (SPEC §7.2), spelled here so that --version and --help import nothing else
EXIT_GENERIC = 1
EXIT_USAGE = 2

ROLES = ("server", "client", "standalone")
USAGE = f"""usage: portunus [--version] <role> [options]

Portunus {__version__} — a port-forwarding appliance in one file.

roles:
  standalone   forward ports from a local TOML file (no server)
  server       control plane: state, operator API, pushes rules to clients
  client       edge agent: receives rules from a server and moves the bytes

Also callable as portunus-standalone / portunus-server / portunus-client
(symlinks to this file). Run 'portunus <role> --help' for a role's options.
"""


class _NotRaised(Exception):
    """Stands in for PortunusError in the except clause while errors.py is not imported: nothing can
    have raised one then (``portunus-client --help`` never imports it)."""


def _portunus_error() -> type[Exception]:
    errors = sys.modules.get("portunus.errors")
    return errors.PortunusError if errors is not None else _NotRaised


# one-shot commands whose process ends right after its work: once its output is flushed there is
# nothing to finalize (no store, no threads; the bundle is fsynced), and tearing the interpreter
# down costs ~10 % of `client enroll`'s instructions, on the fresh-deploy path between the
# enrollment and the client start. Only when run as the program (argv None), never under a caller.
_ONE_SHOT = {("client", "enroll")}


def _exit_now(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # let the normal exit report it
    os._exit(code)


def _role_main(role: str, argv: list[str]) -> int:
    if role == "standalone":
        from .cli.standalone import main
        return main(argv)
    try:
        import importlib
        mod = importlib.import_module(f".cli.{role}", __package__)
    except ModuleNotFoundError:
        print(f"error: usage: the {role} role is not part of this build yet; "
              "see README.md for what works today", file=sys.stderr)
        return EXIT_USAGE
    return mod.main(argv)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "portunus"
    args = argv[1:]
    role = None
    for r in ROLES:
        if prog == f"portunus-{r}":
            role = r
    if role is not None and args[:1] == [role]:
        args = args[1:]  # `portunus-server server …` is `portunus server …`: the role may be said twice
    if role is None:
        if not args or args[0] in ("-h", "--help", "help"):
            print(USAGE)
            return 0 if args else EXIT_USAGE
        if args[0] in ("--version", "-V", "version"):
            print(f"portunus {__version__}")
            return 0
        if args[0] not in ROLES:
            print(f"error: usage: unknown role {args[0]!r} (expected one of: {', '.join(ROLES)})", file=sys.stderr)
            return EXIT_USAGE
        role, args = args[0], args[1:]
    if args[:1] in (["--version"], ["-V"]):
        print(f"portunus-{role} {__version__}")
        return 0
    try:
        code = _role_main(role, args)
        if as_program and (role, args[0] if args else None) in _ONE_SHOT:
            _exit_now(code)
        return code
    except _portunus_error() as exc:
        print(exc.cli_line(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `list-rules | head`: the reader left; not an error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except Exception as exc:  # never a traceback for the operator unless asked for
        if os.environ.get("PORTUNUS_DEBUG") == "1":
            raise
        print(f"error: internal: {type(exc).__name__}: {exc} (set PORTUNUS_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_GENERIC


if __name__ == "__main__":
    sys.exit(main())
