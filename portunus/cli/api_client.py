"""The operator API client the CLI and the demo share: bearer auth, JSON in and out, API errors
turned back into PortunusError with their code, message and fields."""

from __future__ import annotations

import json
import os

from ..errors import PortunusError

# urllib.request (http.client, email, ssl: ~20 ms) is imported by the first call, not by every
# command line that merely builds its parser (`serve` included)


class ApiClient:
    def __init__(self, base_url: str, token: str | None):
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body=None, timeout: float = 30.0):
        """(HTTP status, decoded body); an API error is raised as its PortunusError."""
        if not self.token:
            raise PortunusError("unauthenticated", "PORTUNUS_OPERATOR_TOKEN is not set")
        import urllib.error
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            payload = _decode(exc.read())
            err = payload.get("error") if isinstance(payload, dict) else None
            if isinstance(err, dict) and err.get("code"):
                fields = {k: v for k, v in err.items() if k not in ("code", "message")}
                raise PortunusError(err["code"], err.get("message"), **fields) from None
            raise PortunusError("server_unreachable", f"{method} {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PortunusError("server_unreachable", f"cannot reach the server at {self.base}: {reason}") from None

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)[1]


def _decode(raw: bytes):
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"raw": raw.decode(errors="replace")}


def quote(text: str) -> str:
    """One path segment of a URL (a client or rule reference may hold any character)."""
    import urllib.parse
    return urllib.parse.quote(text, safe="")


def running_server_url(data_dir: str) -> str | None:
    """The operator URL of the `serve` running on this data dir, if one is."""
    from ..server.runtime_info import read_runtime_info  # serve.json alone, not serve's imports
    info = read_runtime_info(data_dir)
    if info and _pid_alive(info.get("pid")):
        return info["operator_http_url"]
    return None


def operator_api_url(args) -> str | None:
    """--server, else $PORTUNUS_SERVER, else the running server of --data-dir; None when none is found."""
    if args.server:
        return args.server
    if os.environ.get("PORTUNUS_SERVER"):
        return os.environ["PORTUNUS_SERVER"]
    return running_server_url(args.data_dir)


def operator_api(args) -> ApiClient:
    """The API client an online command uses (bearer: $PORTUNUS_OPERATOR_TOKEN); with no server
    found, the operator listener in the data dir's config."""
    url = operator_api_url(args)
    if url is None:
        from ..server import config as server_config
        cfg = server_config.load(args.data_dir)
        host, port = cfg.http_addr
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    return ApiClient(url, os.environ.get("PORTUNUS_OPERATOR_TOKEN"))


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
