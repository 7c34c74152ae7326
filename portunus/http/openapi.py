"""A machine-readable description of the operator API, built from the routing table (``routes.ROUTES``)."""

from __future__ import annotations

import re

from .. import __version__
from .auth import PUBLIC, SESSION_COOKIE


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
        op["x-portunus-access"] = route.access  # public | authenticated | owner | superadmin
        if route.access != PUBLIC:
            op["security"] = [{"bearer": []}, {"session": []}]
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Portunus operator API", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                # cookie writes also need Origin, X-Portunus-CSRF: 1 and a JSON body (SPEC §5)
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            },
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}, "required": ["code", "message"]}}}},
        },
    }
