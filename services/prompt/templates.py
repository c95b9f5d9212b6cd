"""Safe `{{name}}` templates: plain substitution, no expressions, no code execution.

A placeholder is `{{` + optional spaces + a variable name + optional spaces + `}}`; a name is a
letter or `_` followed by up to 63 letters, digits or `_`. Anything else between `{{` and `}}`
(`{{ user.name }}`, `{{ 1 + 1 }}`, `{{}}`) is rejected when a version is created, so a template
that is stored always renders. Text outside placeholders is copied unchanged.

Rendering is one pass over the template: a variable's value is inserted as-is and never scanned
again, so a value containing `{{other}}` stays literal text (no injection into the template).
Scanning is linear in the template (a `{{` with no `}}` after it ends the scan, rather than each
one being searched to the end), and a rendering longer than `MAX_RENDERED_CHARS` (one short
value repeated by many placeholders) is refused before it is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from promptline.rules import invalid

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_VARIABLES = 64
MAX_RENDERED_CHARS = 4_000_000
"""About a million tokens: more than any model's context window."""


def _spans(template: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, what is between the braces) of each `{{...}}`, in order."""
    at = 0
    while (start := template.find("{{", at)) >= 0:
        end = template.find("}}", start + 2)
        if end < 0:
            return  # no `}}` after this `{{`, so none after any later one
        yield start, end + 2, template[start + 2:end]
        at = end + 2


def placeholders(template: str) -> tuple[str, ...]:
    """The variable names a template uses, in order of first use; rejects malformed ones."""
    names: dict[str, None] = {}
    for start, end, inner in _spans(template):
        name = inner.strip()
        if not NAME.fullmatch(name):
            line = template.count("\n", 0, start) + 1
            whole = template[start:end]
            shown = whole if len(whole) <= 40 else whole[:37] + "..."
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
    spans = list(_spans(template))
    size = len(template) + sum(len(values[inner.strip()]) - (end - start)
                               for start, end, inner in spans)
    if size > MAX_RENDERED_CHARS:
        raise invalid(f"the prompt's template with these variables would be {size:,} characters "
                      f"long; at most {MAX_RENDERED_CHARS:,} are allowed")
    out: list[str] = []
    at = 0
    for start, end, inner in spans:
        out += (template[at:start], values[inner.strip()])
        at = end
    out.append(template[at:])
    return "".join(out)
