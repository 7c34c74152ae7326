"""A machine-readable description of the operator API, built from the routing table (``routes.ROUTES``)."""

from __future__ import annotations

import re

from .. import __version__
from .auth import PUBLIC


def document(routes) -> dict:
    paths: dict = {}
    for route in routes:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route.pattern)
        op = {
            "summary": route.summary,
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
        if route.access != PUBLIC:
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[route.method.lower()] = op
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
