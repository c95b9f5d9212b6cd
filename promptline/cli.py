"""`promptline prompts ...`: manage prompt versions and labels from a terminal, over the edge's
HTTP API; `promptline config ...`: the config file's JSON Schema and reference.

    promptline prompts create ID (--template TEXT | --template-file PATH | -) [--var NAME ...]
                              [--model M] [--max-tokens N] [--temperature T] -m MESSAGE
                              [--author NAME] [--response-format-file PATH [--json-validate]]
    promptline prompts list ID [--limit N] [--before N]
    promptline prompts get ID (VERSION | --label LABEL)
    promptline prompts label ID LABEL VERSION          # promote (a split of 100)
    promptline prompts label ID LABEL --split 3=90,4=10  # A/B: weights by version, sum 100
    promptline prompts label ID LABEL --rollback       # the label's state before its last move
                                                       # (--require-eval: refuse versions new to
                                                       # the label without a passing eval run)
    promptline prompts eval ID --version N [--against LABEL] --cases CASES.jsonl
                            [--concurrency 8] [--judge-model M] [--json REPORT.json|-]
                            [--no-store]               # cases through the chain, a table per
                                                       # version, the run stored on N; exit 1
                                                       # on a regression (promptline/evals.py)
    promptline prompts stats ID [--from DATE] [--to DATE]  # per version: requests, errors,
                                                       # first token, tokens, feedback
    promptline usage [--from DATE] [--to DATE] [--group-by model|day|api_key|user]
                     [--tenant NAME] [--csv]           # requests, tokens and cost
    promptline config schema                           # JSON Schema of the config file
    promptline config docs                             # docs/configuration.md

`--url` (env PROMPTLINE_URL, default http://127.0.0.1:8080) and `--api-key` (env
PROMPTLINE_API_KEY) select the edge and the tenant. `--json` prints the API's JSON. Exit codes:
0 done, 1 the server refused (the error code and message go to stderr), 2 bad usage or the edge
is unreachable. The `config` verbs work offline and need no key.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 30.0
USAGE_GROUPS = ("model", "day", "api_key", "user")  # rules.USAGE_GROUPS; the CLI imports nothing
USAGE_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd")
STATS_COLUMNS = ("requests", "errors", "cancelled", "first_token_p50_ms", "first_token_p95_ms",
                 "prompt_tokens", "completion_tokens", "feedback_count", "feedback_mean")


class CliError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    # The connection options work before or after the verb (`promptline --json prompts list x`
    # and `promptline prompts list x --json`): SUPPRESS keeps a verb's parser from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"edge base URL (env PROMPTLINE_URL; default {DEFAULT_URL})")
    common.add_argument("--api-key", default=argparse.SUPPRESS,
                        help="API key (env PROMPTLINE_API_KEY); writes need an admin tenant")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the API's JSON response")
    parser = argparse.ArgumentParser(prog="promptline", parents=[common],
                                     description="Promptline command-line tools.")
    groups = parser.add_subparsers(dest="group", required=True)
    prompts = groups.add_parser("prompts", help="manage prompt versions and labels")
    verbs = prompts.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help_text, parents=[common])

    # `eval` takes `--json PATH` (the report file), so its parent has no `--json` flag.
    connection = argparse.ArgumentParser(add_help=False)
    for action in common._actions:
        if action.dest in ("url", "api_key"):
            connection._add_action(action)

    create = verb("create", "create a new version of a prompt")
    create.add_argument("prompt_id")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--template", help="template text ({{name}} placeholders)")
    source.add_argument("--template-file", help="read the template from a file ('-': stdin)")
    create.add_argument("--var", action="append", default=[], dest="variables",
                        help="declared variable name (repeat; default: the template's)")
    create.add_argument("--model", default="", help="default model")
    create.add_argument("--max-tokens", type=int, default=None, help="default max_tokens")
    create.add_argument("--temperature", type=float, default=None, help="default temperature")
    create.add_argument("-m", "--message", required=True, help="commit message")
    create.add_argument("--author", default=None, help="author (default: your login name)")
    create.add_argument("--response-format-file", default=None, metavar="PATH",
                        help="default response_format: a JSON file in OpenAI's shape, e.g. "
                             '{"type": "json_schema", "json_schema": {"name", "schema"}}')
    create.add_argument("--json-validate", action="store_true",
                        help="chats check their reply against the response format")

    listing = verb("list", "list a prompt's versions, newest first")
    listing.add_argument("prompt_id")
    listing.add_argument("--limit", type=int, default=None, help="versions per page (1-200)")
    listing.add_argument("--before", type=int, default=None, help="only versions older than N")

    get = verb("get", "show one version (by number or label)")
    get.add_argument("prompt_id")
    which = get.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", type=int, help="version number")
    which.add_argument("--label", help="label to resolve, e.g. prod")

    label = verb("label", "point a label at a version or split it between versions "
                          "(promote / roll back)")
    label.add_argument("prompt_id")
    label.add_argument("label")
    move = label.add_mutually_exclusive_group(required=True)
    move.add_argument("version", nargs="?", type=int, help="version number")
    move.add_argument("--split", default=None, metavar="V=W,...",
                      help="weights by version adding up to 100, e.g. 3=90,4=10")
    move.add_argument("--rollback", action="store_true",
                      help="restore the label's state before its last move")
    label.add_argument("--require-eval", action="store_true",
                       help="refuse unless each version new to the label has a passing eval "
                            "run")

    run = verbs.add_parser("eval", parents=[connection],
                           help="run a cases file against a version through the chain")
    run.add_argument("prompt_id")
    run.add_argument("--version", type=int, required=True, help="the version to evaluate")
    run.add_argument("--against", default=None, metavar="LABEL",
                     help="also run the label's version; exit 1 on a regression")
    run.add_argument("--cases", required=True, metavar="PATH", help="JSON Lines, one case a line")
    run.add_argument("--concurrency", type=int, default=8, help="cases at a time (default 8)")
    run.add_argument("--judge-model", default="", help="the model that answers `judge` cases")
    run.add_argument("--json", dest="report", default=None, metavar="PATH",
                     help="write the JSON report to PATH ('-': stdout)")
    run.add_argument("--no-store", action="store_true",
                     help="do not store the run on the version")

    stats = verb("stats", "per-version requests, errors, first-token times, tokens and "
                          "feedback of a prompt")
    stats.add_argument("prompt_id")
    stats.add_argument("--from", dest="start", default=None, metavar="DATE",
                       help="ISO 8601 date or date-time, UTC (default: the start of today)")
    stats.add_argument("--to", dest="end", default=None, metavar="DATE",
                       help="end, exclusive (default: now)")

    usage = groups.add_parser("usage", parents=[common],
                              help="requests, tokens and cost of your tenant (GET /v1/usage)")
    usage.add_argument("--from", dest="start", default=None, metavar="DATE",
                       help="ISO 8601 date or date-time, UTC (default: the start of today)")
    usage.add_argument("--to", dest="end", default=None, metavar="DATE",
                       help="end, exclusive (default: now)")
    usage.add_argument("--group-by", default="model", choices=USAGE_GROUPS,
                       help="rows by model (default), UTC day, API key or end user")
    usage.add_argument("--tenant", default=None,
                       help="another tenant's usage (needs a key of an admin tenant)")
    usage.add_argument("--csv", action="store_true", help="print the rows as CSV")

    config = groups.add_parser("config", help="the config file's JSON Schema and reference")
    config_verbs = config.add_subparsers(dest="verb", required=True)
    config_verbs.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the config "
                                           "file, for editors and CI")
    config_verbs.add_parser("docs", help="print docs/configuration.md, generated from the key "
                                         "declarations")
    return parser


def main(argv: Sequence[str] | None = None, *, env: dict[str, str] | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    env = dict(os.environ) if env is None else env
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    if args.group == "config":
        try:
            stdout.write(_config_output(args.verb))
        except CliError as exc:
            print(f"promptline: {exc}", file=stderr)
            return exc.exit_code
        return 0
    url = (getattr(args, "url", None) or env.get("PROMPTLINE_URL") or DEFAULT_URL).rstrip("/")
    api_key = getattr(args, "api_key", None) or env.get("PROMPTLINE_API_KEY")
    as_json = getattr(args, "json", False)
    try:
        if not api_key:
            raise CliError("no API key: pass --api-key or set PROMPTLINE_API_KEY", 2)
        if not url.startswith(("http://", "https://")):
            raise CliError(f"--url must be an http:// or https:// URL, got {url!r}", 2)
        client = _Client(url, api_key)
        if args.group == "prompts" and args.verb == "eval":
            return _eval(args, client, stdout, stderr)
        data, text = _usage(args, client) if args.group == "usage" else _run(args, client, stdin)
    except CliError as exc:
        print(f"promptline: {exc}", file=stderr)
        return exc.exit_code
    print(json.dumps(data, indent=2, ensure_ascii=False) if as_json else text, file=stdout)
    return 0


def _config_output(verb: str) -> str:
    # Imported here: the prompts verbs need neither the config loader nor YAML.
    try:
        from promptline.config_docs import config_schema, render_docs
    except ImportError as exc:  # the slim client install
        raise CliError(f"the config verbs need the server extra (pip install "
                       f"'promptline[server]'): {exc.name} is missing", 2) from None

    if verb == "schema":
        return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
    return render_docs()


def _run(args: argparse.Namespace, client: _Client, stdin: TextIO) -> tuple[Any, str]:
    pid = urllib.parse.quote(args.prompt_id, safe="")
    if args.verb == "create":
        if args.template is not None:
            template = args.template
        elif args.template_file == "-":
            template = stdin.read()
        else:
            try:
                with open(args.template_file, encoding="utf-8") as handle:
                    template = handle.read()
            except OSError as exc:
                raise CliError(f"cannot read {args.template_file}: {exc.strerror}", 2) from None
        parameters = {k: v for k, v in (("max_tokens", args.max_tokens),
                                        ("temperature", args.temperature)) if v is not None}
        body = {"template": template, "variables": args.variables, "model": args.model,
                "parameters": parameters, "message": args.message,
                "author": args.author if args.author is not None else _login()}
        if args.response_format_file is not None:
            body["response_format"] = _json_file(args.response_format_file)
        if args.json_validate:
            body["json_validate"] = True
        data = client.request("POST", f"/v1/prompts/{pid}/versions", body)
        return data, f"created {data['prompt_id']} version {data['version']}"
    if args.verb == "list":
        data = client.request("GET", _with_query(f"/v1/prompts/{pid}/versions",
                                                 limit=args.limit, before=args.before))
        return data, _version_table(data)
    if args.verb == "get":
        if args.label is not None:
            path = f"/v1/prompts/{pid}/labels/{urllib.parse.quote(args.label, safe='')}"
        else:
            path = f"/v1/prompts/{pid}/versions/{args.version}"
        data = client.request("GET", path)
        return data, _version_text(data)
    if args.verb == "stats":
        data = client.request("GET", _with_query(f"/v1/prompts/{pid}/stats",
                                                 **{"from": args.start, "to": args.end}))
        return data, _stats_table(data)
    label = urllib.parse.quote(args.label, safe="")
    if args.rollback:
        data = client.request("POST", f"/v1/prompts/{pid}/labels/{label}/rollback", {})
    else:
        move: dict[str, Any] = ({"split": _split_arg(args.split)} if args.split is not None
                                else {"version": args.version})
        if args.require_eval:
            move["require_eval"] = True
        data = client.request("PUT", f"/v1/prompts/{pid}/labels/{label}", move)
    before = data.get("previous_version") or _split_text(data.get("previous_split"))
    moved = f" (was {before})" if before else " (new label)"
    return data, f"{data['prompt_id']}: {data['label']} -> {_split_text(data['split'])}{moved}"


_COUNT = re.compile(r"[0-9]{1,9}")
"""ASCII digits only (`isdigit` passes `²`, which `int` refuses), and never more than a split's
weights and versions need."""


def _split_arg(text: str) -> dict[str, int]:
    """`3=90,4=10` as the API's split; the server checks versions and weights."""
    split: dict[str, int] = {}
    for part in text.split(","):
        version, _, weight = part.strip().partition("=")
        if not (_COUNT.fullmatch(version.strip()) and _COUNT.fullmatch(weight.strip())):
            raise CliError(f"--split wants VERSION=WEIGHT pairs separated by commas, e.g. "
                           f"3=90,4=10; got {part.strip()!r}", 2)
        split[str(int(version))] = int(weight)
    return split


def _case_text(case: Any) -> str:
    """`line 4 (greets)`, or `line 4` for a case without a name of its own."""
    own = case.name != f"line {case.line}"
    return f"line {case.line} ({case.name})" if own else f"line {case.line}"


def _check_judge_model(client: _Client, model: str) -> None:
    """The judge model is one this key's tenant may use (`GET /v1/models`), before any case
    runs: else every judged case would fail on it, after the whole run."""
    allowed = [m.get("id") for m in client.request("GET", "/v1/models").get("data", [])]
    if model not in allowed:
        raise CliError(f"--judge-model {model!r} is not a model this API key may use; "
                       f"GET /v1/models lists: {', '.join(map(str, allowed)) or 'none'}", 2)


def _split_text(split: dict[str, int] | None) -> str:
    """`version 3`, or `3=90% 4=10%` for a split."""
    if not split:
        return ""
    if len(split) == 1:
        return f"version {next(iter(split))}"
    return " ".join(f"{v}={w}%" for v, w in split.items())


def _eval(args: argparse.Namespace, client: _Client, stdout: TextIO, stderr: TextIO) -> int:
    """Run the cases on --version (and --against's version), print the table, store the run;
    1 on a regression (without --against: on any failed case)."""
    from promptline import evals

    pid = urllib.parse.quote(args.prompt_id, safe="")
    if not 1 <= args.concurrency <= 256:
        raise CliError("--concurrency must be between 1 and 256", 2)
    try:
        with open(args.cases, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.cases}: {exc.strerror}", 2) from None
    try:
        cases = evals.load_cases(raw, args.cases, judge_model=args.judge_model)
    except evals.EvalInputError as exc:
        raise CliError(str(exc), 2) from None
    client.request("GET", f"/v1/prompts/{pid}/versions/{args.version}")  # 404 before any case
    if any("judge" in case.checks for case in cases):
        _check_judge_model(client, args.judge_model)
    versions = [(args.version, "")]
    if args.against:
        label = urllib.parse.quote(args.against, safe="")
        against = client.request("GET", f"/v1/prompts/{pid}/labels/{label}")["version"]
        versions.append((against, args.against))
    runner = evals.Runner(client.base_url, client.api_key, args.prompt_id,
                          judge_model=args.judge_model, concurrency=args.concurrency,
                          progress=stderr)
    runs = runner.run(cases, versions)
    candidate = runs[0]
    lost = evals.regressions(candidate, runs[1]) if len(runs) > 1 else []
    regressed = len(runs) > 1 and (bool(lost) or candidate.pass_rate < runs[1].pass_rate)
    failed = regressed if len(runs) > 1 else candidate.passed < len(candidate.results)
    report: dict[str, Any] = {
        "object": "eval_report", "prompt_id": args.prompt_id, "cases_file": args.cases,
        "cases_sha256": evals.cases_digest(raw),
        "versions": [{**r.summary(), "results": [x.to_json() for x in r.results]}
                     for r in runs],
        "regressions": [{"line": r.case.line, "name": r.case.name, "failures": r.failures}
                        for r in lost],
        "regressed": regressed, "stored": None}
    if not args.no_store:
        summary = candidate.summary()
        body = {k: summary[k] for k in ("cases", "passed", "first_token_p50_ms", "total_p50_ms",
                                        "prompt_tokens", "completion_tokens", "cost_usd")}
        body.update(regressions=len(lost), cases_sha256=report["cases_sha256"],
                    author=_login(), judge_model=args.judge_model or None)
        if len(runs) > 1:
            body.update(against_label=args.against, against_version=runs[1].version)
        report["stored"] = client.request("POST", f"/v1/prompts/{pid}/versions/"
                                                  f"{args.version}/evals", body)
    lines = [f"prompt {args.prompt_id}, {len(cases)} cases from {args.cases}",
             evals.table(runs)]
    for run in runs:
        for result in run.results:
            if not result.passed:
                lines.append(f"FAIL version {run.version} {_case_text(result.case)}: "
                             f"{'; '.join(result.failures)}")
    if lost:
        lines.append("regressions: " + ", ".join(_case_text(r.case) for r in lost))
    elif regressed:
        lines.append("regression: a lower pass rate than " + args.against)
    if report["stored"]:
        lines.append(f"stored as eval {report['stored']['eval_id']} on version {args.version}")
    if args.report == "-":
        print(json.dumps(report, indent=2, ensure_ascii=False), file=stdout)
    else:
        print("\n".join(lines), file=stdout)
        if args.report:
            try:
                with open(args.report, "w", encoding="utf-8") as handle:
                    json.dump(report, handle, indent=2, ensure_ascii=False)
            except OSError as exc:
                raise CliError(f"cannot write {args.report}: {exc.strerror}", 2) from None
    return 1 if failed else 0


def _with_query(path: str, **params: Any) -> str:
    """`path` with the parameters that have a value as its query string."""
    query = {k: v for k, v in params.items() if v}
    return f"{path}?{urllib.parse.urlencode(query)}" if query else path


def _usage(args: argparse.Namespace, client: _Client) -> tuple[Any, str]:
    data = client.request("GET", _with_query("/v1/usage", group_by=args.group_by,
                                             tenant=args.tenant,
                                             **{"from": args.start, "to": args.end}))
    if args.csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow((data["group_by"], *USAGE_COLUMNS))
        for row in data["data"]:
            writer.writerow((row["key"] or "", *(row[c] for c in USAGE_COLUMNS)))
        return data, out.getvalue().rstrip("\n")
    return data, _usage_table(data)


def _usage_table(data: dict[str, Any]) -> str:
    head = (data["group_by"].upper(), *(c.upper() for c in USAGE_COLUMNS))
    rows = [head, *((row["key"] or "(none)", *(str(row[c]) for c in USAGE_COLUMNS))
                    for row in data["data"]),
            ("TOTAL", *(str(data["total"][c]) for c in USAGE_COLUMNS))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"tenant {data['tenant']}, {data['from']} to {data['to']}"]
    lines += ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                        for i, cell in enumerate(row)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _stats_table(data: dict[str, Any]) -> str:
    head = ("VERSION", *(c.upper() for c in STATS_COLUMNS), "ERRORS_BY_CODE")
    rows = [head, *((str(v["version"]),
                     *("-" if v[c] is None else str(v[c]) for c in STATS_COLUMNS),
                     " ".join(f"{code}={n}" for code, n in v["errors_by_code"].items()) or "-")
                    for v in data["versions"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"prompt {data['prompt_id']}, {data['from']} to {data['to']}"]
    lines += ["  ".join(cell.ljust(widths[i]) if i in (0, len(head) - 1)
                        else cell.rjust(widths[i]) for i, cell in enumerate(row))
              for row in rows]
    if not data["versions"]:
        lines.append("(no requests in this range)")
    return "\n".join(line.rstrip() for line in lines)


class _Client:
    """JSON over HTTP to the edge, with the Bearer key; errors become CliError."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(_http_error(exc), 1) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach {self.base_url}: {reason}", 2) from None
        return json.loads(raw) if raw else {}


def _http_error(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{error['code']}: {error['message']} (HTTP {exc.code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}"


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "-"


def _version_table(data: dict[str, Any]) -> str:
    rows = [("VERSION", "LABELS", "MODEL", "AUTHOR", "CREATED", "MESSAGE")]
    for v in data["versions"]:
        rows.append((str(v["version"]), ",".join(v["labels"]) or "-", v["model"] or "-",
                     v["author"] or "-", _when(v["created_at_ms"]),
                     v["message"].splitlines()[0] if v["message"] else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
             for row in rows]
    if data.get("next_before"):
        lines.append(f"(older versions: --before {data['next_before']})")
    return "\n".join(line.rstrip() for line in lines)


def _json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", 2) from None
    except ValueError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}", 2) from None


def _version_text(v: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={val}" for k, val in v["parameters"].items()) or "-"
    return "\n".join([
        f"prompt:     {v['prompt_id']}",
        f"version:    {v['version']}",
        f"labels:     {', '.join(v['labels']) or '-'}",
        f"variables:  {', '.join(v['variables']) or '-'}",
        f"model:      {v['model'] or '-'}",
        f"parameters: {params}",
        *([f"format:     {json.dumps(v['response_format'], ensure_ascii=False)}"
           + (" (validated)" if v.get("json_validate") else "")]
          if v.get("response_format") else []),
        f"author:     {v['author'] or '-'}",
        f"created:    {_when(v['created_at_ms'])}",
        f"message:    {v['message']}",
        "template:",
        v["template"],
    ])


if __name__ == "__main__":
    raise SystemExit(main())
