"""Run drills in order, one row each; `python -m promptline.devtools.drills` (`make drills`).

    python -m promptline.devtools.drills [--smoke] [--only redis,engine-kill] [--out DIR]

Prints each row as it finishes, then the table; writes `drills.json` and `drills.md` to `--out`
(default bench/results/drills-<time>/). Exit status 1 when a drill fails.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from promptline.devtools.drills.harness import Env, Result, Scale

Drill = Callable[[Env], Awaitable[Result]]

# Each module has DRILLS: {name: drill}; this order is the report's.
MODULES = (
    "promptline.devtools.drills.redis_drills",
    "promptline.devtools.drills.process_drills",
    "promptline.devtools.drills.provider_drills",
    "promptline.devtools.drills.reader_drills",
    "promptline.devtools.drills.fuzz_drill",
    "promptline.devtools.drills.capacity_drill",
)
BOUND_S = {False: 240.0, True: 90.0}  # one drill's wall-clock cap: a hung drill fails, not the run


def catalog() -> dict[str, Drill]:
    drills: dict[str, Drill] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # not written yet
        drills.update(module.DRILLS)
    return drills


async def run_drills(names: list[str] | None, scale: Scale, *, fault: str | None = None,
                     workdir: Path | None = None,
                     report: Callable[[Result], None] | None = None) -> list[Result]:
    """Run the named drills (all when None) in catalog order, each bounded in time."""
    drills = catalog()
    unknown = set(names or ()) - set(drills)
    if unknown:
        raise ValueError(f"unknown drills: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(drills)})")
    chosen = [n for n in drills if names is None or n in names]
    results = []
    with tempfile.TemporaryDirectory(prefix="promptline-drills-") as tmp:
        async with Env(scale, workdir or Path(tmp), fault) as env:
            for name in chosen:
                result = await _one(name, drills[name], env)
                results.append(result)
                if report is not None:
                    report(result)
    return results


async def _one(name: str, drill: Drill, env: Env) -> Result:
    started = time.monotonic()
    try:
        async with asyncio.timeout(BOUND_S[env.scale.smoke]):
            result = await drill(env)
    except Exception as exc:  # a drill that breaks is a failed row, and the run goes on
        result = Result(name, "(the drill itself failed)", "a completed drill",
                        {"exception": f"{type(exc).__name__}: {exc}",
                         "where": traceback.format_exc(limit=-3)})
        result.failures.append("the drill raised")
    result.seconds = round(time.monotonic() - started, 1)
    return result


def table(results: list[Result]) -> str:
    """The report as a Markdown table."""
    lines = ["| drill | done | expected | observed | result |", "|---|---|---|---|---|"]
    for r in results:
        observed = "; ".join(f"{k}: {_short(v)}" for k, v in r.observed.items())
        verdict = "pass" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(f"| {r.name} | {r.action} | {r.expected} | {observed} | {verdict} |")
    return "\n".join(lines)


def _short(value: object) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fault drills on a local deployment.")
    parser.add_argument("--smoke", action="store_true", help="the seconds-long versions")
    parser.add_argument("--only", default="", help="comma-separated drill names")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes")
    parser.add_argument("--list", action="store_true", help="list the drills and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(catalog()))
        return 0
    out = args.out or Path("bench/results") / time.strftime("drills-%Y%m%d-%H%M%S")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or None

    def report(result: Result) -> None:
        mark = "pass" if result.passed else "FAIL"
        print(f"drills: {result.name}: {mark} in {result.seconds:g} s "
              f"{json.dumps(result.observed, default=str)}"
              + ("" if result.passed else f" -- {'; '.join(result.failures)}"), flush=True)

    started = time.monotonic()
    try:
        results = asyncio.run(run_drills(names, Scale(smoke=args.smoke), report=report))
    except ValueError as exc:
        print(f"drills: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "drills.json").write_text(json.dumps(
        {"smoke": args.smoke, "seconds": round(time.monotonic() - started, 1),
         "drills": [r.to_json() for r in results]}, indent=2, default=str))
    (out / "drills.md").write_text(table(results) + "\n")
    print(table(results))
    failed = [r.name for r in results if not r.passed]
    print(f"drills: {len(results) - len(failed)}/{len(results)} passed in "
          f"{time.monotonic() - started:.0f} s; report in {out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
