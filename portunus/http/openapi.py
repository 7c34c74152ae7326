"""A machine-readable description of the operator API, built from the routing table."""

from __future__ import annotations

import re

from .. import __version__


def document(routes) -> dict:
    paths: dict = {}
    for method, pattern, _fn, summary in routes:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
        op = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": "Error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{(\w+)}", path)]
        if params:
            op["parameters"] = params
        if path not in ("/v1/auth/status", "/v1/openapi.json"):
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Portunus operator API", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}, "required": ["code", "message"]}}}},
        },
    }
