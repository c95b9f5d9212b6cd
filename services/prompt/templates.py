"""Safe `{{name}}` templates: plain substitution, no expressions, no code execution.

A placeholder is `{{` + optional spaces + a variable name + optional spaces + `}}`; a name is a
letter or `_` followed by up to 63 letters, digits or `_`. Anything else between `{{` and `}}`
(`{{ user.name }}`, `{{ 1 + 1 }}`, `{{}}`) is rejected when a version is created, so a template
that is stored always renders. Text outside placeholders is copied unchanged.

Rendering is one pass over the template: a variable's value is inserted as-is and never scanned
again, so a value containing `{{other}}` stays literal text (no injection into the template).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from promptline.rules import invalid

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_VARIABLES = 64
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)



def placeholders(template: str) -> tuple[str, ...]:
    """The variable names a template uses, in order of first use; rejects malformed ones."""
    names: dict[str, None] = {}
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1).strip()
        if not NAME.fullmatch(name):
            line = template.count("\n", 0, match.start()) + 1
            shown = match.group(0) if len(match.group(0)) <= 40 else match.group(0)[:37] + "..."
            raise invalid(f"template line {line}: invalid placeholder {shown!r} "
                          "(use {{name}}: a letter or _ then letters, digits or _)")
        names[name] = None
    if len(names) > MAX_VARIABLES:
        raise invalid(f"template uses {len(names)} variables; at most {MAX_VARIABLES} are allowed")
    return tuple(names)


def declared_variables(template: str, declared: Iterable[str]) -> tuple[str, ...]:
    """Check declared names against the template's placeholders; empty: take the template's."""
    used = placeholders(template)
    names = list(declared)
    if not names:
        return used
    seen: set[str] = set()
    for name in names:
        if not NAME.fullmatch(name):
            raise invalid(f"variable name {name!r} is invalid "
                          "(a letter or _ then up to 63 letters, digits or _)")
        if name in seen:
            raise invalid(f"variable {name!r} is declared twice")
        seen.add(name)
    for name in used:
        if name not in seen:
            raise invalid(f"template uses variable {name!r}, which is not declared")
    for name in names:
        if name not in used:
            raise invalid(f"variable {name!r} is declared but the template does not use it")
    return tuple(names)


def render(template: str, declared: Iterable[str], values: Mapping[str, str]) -> str:
    """Substitute `values` into `template`; an unknown or missing variable is INVALID_REQUEST
    naming it."""
    known = tuple(declared)
    for name in sorted(values):
        if name not in known:
            listed = ", ".join(known) if known else "none"
            raise invalid(f"unknown prompt variable {name!r} (the prompt declares: {listed})")
    for name in known:
        if name not in values:
            raise invalid(f"missing prompt variable {name!r}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1).strip()], template)
