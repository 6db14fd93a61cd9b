"""Prompt templates as package data (jinja); loading only, no logic."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import jinja2


@cache
def template(name: str) -> jinja2.Template:
    text = (resources.files(__name__) / f"{name}.jinja").read_text(encoding="utf-8")
    return jinja2.Environment(keep_trailing_newline=True, autoescape=False).from_string(text)


def render(name: str, **values: Any) -> str:
    return template(name).render(**values)
