"""`promptline prompts eval`: run a file of cases against a prompt version through the real chain.

A cases file is JSON Lines, one case per line (blank lines and lines starting with `#` are
skipped)::

    {"name": "greets", "variables": {"name": "Ada"}, "contains": "Ada", "max_total_ms": 5000}
    {"messages": [{"role": "user", "content": "JSON please"}], "json_schema": {"type": "object"}}
    {"variables": {"name": "Bo"}, "judge": "The reply is polite and names the user."}

Fields: `name` (a label for the report), `variables` (strings), `messages` (default: one user
message "Hello."), and at least one assertion: `contains` / `not_contains` (a string or a list
of strings; case-sensitive), `regex` (Python `re`, searched), `equals` (the whole reply, spaces
at the ends ignored), `json_schema` (the reply parses as JSON and fits the schema:
promptline/response_format.py's check), `max_first_token_ms`, `max_total_ms`, and `judge` (the
criteria a `--judge-model` reads to answer PASS or FAIL with a reason). A malformed file stops
the run before any request with the line and the field (`EvalInputError`, exit 2).

Each case is one `POST /v1/chat/stream` with `prompt: {id, version, variables}`, read as it
streams (the times are the caller's: to the first delta and to `done`), `--concurrency` at a
time on threads (the CLI needs nothing beyond the standard library). With `--against LABEL` the
same cases run on the label's version (a split label: its heaviest); a case that passes there
and fails on the candidate is a regression, as is a lower pass rate.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

CASE_FIELDS = ("name", "variables", "messages")
ASSERTIONS = ("contains", "not_contains", "regex", "equals", "json_schema",
              "max_first_token_ms", "max_total_ms", "judge")
DEFAULT_MESSAGES = ({"role": "user", "content": "Hello."},)
ROLES = ("system", "user", "assistant")
MAX_CASES = 10_000
CASE_TIMEOUT = 300.0  # seconds: a case is one stream, at most a model's `total` timeout
JUDGE_SYSTEM = (
    "You grade a reply against criteria. Answer with PASS or FAIL as the first word, then one "
    "sentence giving the reason.")
BAR_WIDTH = 30


class EvalInputError(Exception):
    """A malformed cases file or argument: the message names the line and the field."""


@dataclass(frozen=True)
class Case:
    """One line of a cases file, checked."""

    line: int
    name: str
    variables: dict[str, str]
    messages: tuple[dict[str, str], ...]
    checks: dict[str, Any]
    schema: Any = None
    """json_schema's checked ResponseFormat (promptline/response_format.py), if any."""


@dataclass
class CaseResult:
    """What one case did on one version."""

    case: Case
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    text: str = ""
    first_token_ms: int | None = None
    total_ms: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"line": self.case.line, "name": self.case.name, "passed": self.passed,
                "failures": self.failures, "first_token_ms": self.first_token_ms,
                "total_ms": self.total_ms, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
                "error": self.error or None, "text": self.text}


@dataclass
class VersionRun:
    """Every case on one version."""

    version: int
    label: str
    results: list[CaseResult]

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def pass_rate(self) -> float:
        return self.passed / len(self.results) if self.results else 0.0

    def p50(self, name: str) -> int | None:
        values = [getattr(r, name) for r in self.results if getattr(r, name) is not None]
        return round(statistics.median(values)) if values else None

    @property
    def cost_usd(self) -> Decimal | None:
        costs = [r.cost_usd for r in self.results if r.cost_usd is not None]
        return sum(costs, Decimal(0)) if costs else None

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "label": self.label or None,
                "cases": len(self.results), "passed": self.passed,
                "pass_rate": round(self.pass_rate, 6),
                "first_token_p50_ms": self.p50("first_token_ms"),
                "total_p50_ms": self.p50("total_ms"),
                "prompt_tokens": sum(r.prompt_tokens for r in self.results),
                "completion_tokens": sum(r.completion_tokens for r in self.results),
                "cost_usd": None if self.cost_usd is None else format(self.cost_usd, "f")}


def load_cases(raw: bytes, path: str, *, judge_model: str = "") -> list[Case]:
    """Parse and check a cases file; EvalInputError naming the line and the field."""
    cases = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {number}"
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise EvalInputError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise EvalInputError(f"{where}: a case must be a JSON object")
        cases.append(_case(data, number, where, judge_model))
        if len(cases) > MAX_CASES:
            raise EvalInputError(f"{where}: at most {MAX_CASES} cases per file")
    if not cases:
        raise EvalInputError(f"{path}: no cases (one JSON object per line)")
    return cases


def _case(data: dict[str, Any], number: int, where: str, judge_model: str) -> Case:
    for name in data:
        if name not in CASE_FIELDS + ASSERTIONS:
            raise EvalInputError(f"{where}: unknown field {name[:40]!r} (fields: "
                                 f"{', '.join(CASE_FIELDS + ASSERTIONS)})")
    name = data.get("name", f"line {number}")
    if not isinstance(name, str):
        raise EvalInputError(f"{where}: name must be a string")
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise EvalInputError(f"{where}: variables must be an object of strings")
    messages = data.get("messages", list(DEFAULT_MESSAGES))
    if not isinstance(messages, list) or not messages:
        raise EvalInputError(f"{where}: messages must be a non-empty list")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise EvalInputError(f"{where}: messages[{i}] must be {{\"role\": "
                                 f"{'|'.join(ROLES)}, \"content\": string}}")
    checks = {k: data[k] for k in ASSERTIONS if k in data}
    if not checks:
        raise EvalInputError(f"{where}: no assertion (give one of {', '.join(ASSERTIONS)})")
    for key in ("contains", "not_contains"):
        if key in checks:
            value = checks[key]
            if isinstance(value, str):
                checks[key] = [value]
            elif not (isinstance(value, list) and value
                      and all(isinstance(v, str) for v in value)):
                raise EvalInputError(f"{where}: {key} must be a string or a list of strings")
    if "regex" in checks:
        if not isinstance(checks["regex"], str):
            raise EvalInputError(f"{where}: regex must be a string")
        try:
            re.compile(checks["regex"])
        except re.error as exc:
            raise EvalInputError(f"{where}: regex is not a valid expression ({exc})") from None
    if "equals" in checks and not isinstance(checks["equals"], str):
        raise EvalInputError(f"{where}: equals must be a string")
    for key in ("max_first_token_ms", "max_total_ms"):
        value = checks.get(key)
        if key in checks and (isinstance(value, bool) or not isinstance(value, int | float)
                              or value <= 0):
            raise EvalInputError(f"{where}: {key} must be a positive number of milliseconds")
    if "judge" in checks:
        if not isinstance(checks["judge"], str) or not checks["judge"].strip():
            raise EvalInputError(f"{where}: judge must be the criteria, a non-empty string")
        if not judge_model:
            raise EvalInputError(f"{where}: judge needs --judge-model")
    schema = _schema(checks["json_schema"], where) if "json_schema" in checks else None
    return Case(number, name, dict(variables), tuple(messages), checks, schema)


def _schema(value: Any, where: str) -> Any:
    """The schema checked by the owner of JSON Schema rules (promptline/response_format.py)."""
    if not isinstance(value, dict):
        raise EvalInputError(f"{where}: json_schema must be a JSON Schema object")
    try:
        from promptline.errors import PromptlineError
        from promptline.response_format import parse_response_format
        from promptline.v1 import common_pb2
    except ImportError as exc:  # the slim client install
        raise EvalInputError(f"json_schema assertions need the server extra (pip install "
                             f"'promptline[server]'): {exc.name} is missing") from None
    try:
        return parse_response_format(common_pb2.ResponseFormat(
            type="json_schema", name="case", schema=json.dumps(value)), "json_schema")
    except PromptlineError as exc:
        raise EvalInputError(f"{where}: {exc.message}") from None


# --- running -----------------------------------------------------------------------------------


Post = Callable[[str, dict[str, Any]], Any]
"""POST a JSON body to the edge and return the open streaming response (urllib's)."""


@dataclass
class Runner:
    """Runs cases over the edge's HTTP API, `concurrency` at a time."""

    base_url: str
    api_key: str
    prompt_id: str
    judge_model: str = ""
    concurrency: int = 8
    progress: TextIO = sys.stderr

    def run(self, cases: Sequence[Case], versions: Sequence[tuple[int, str]]
            ) -> list[VersionRun]:
        """Every case on every (version, label); a progress bar on `progress`."""
        jobs = [(v, c) for v, _ in versions for c in cases]
        done = 0
        lock = threading.Lock()
        self._bar(0, len(jobs))

        def one(job: tuple[int, Case]) -> CaseResult:
            nonlocal done
            result = self._case(*job)
            with lock:
                done += 1
                self._bar(done, len(jobs))
            return result

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            results = list(pool.map(one, jobs))
        self.progress.write("\n")
        self.progress.flush()
        return [VersionRun(v, label, results[i * len(cases):(i + 1) * len(cases)])
                for i, (v, label) in enumerate(versions)]

    def _bar(self, done: int, total: int) -> None:
        filled = BAR_WIDTH * done // total if total else BAR_WIDTH
        self.progress.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}")
        self.progress.flush()

    def _case(self, version: int, case: Case) -> CaseResult:
        result = CaseResult(case)
        body = {"messages": list(case.messages), "prompt": {
            "id": self.prompt_id, "version": version, "variables": case.variables}}
        try:
            self._stream(body, result)
        except OSError as exc:
            result.error = f"the edge did not answer: {exc}"
        if result.error:
            result.failures.append(result.error)
        else:
            result.failures.extend(self._check(case, result))
        result.passed = not result.failures
        return result

    def _stream(self, body: dict[str, Any], result: CaseResult) -> None:
        """One chat, read as it streams: text, times, usage, or the error that ended it."""
        started = time.perf_counter()
        request = urllib.request.Request(
            self.base_url + "/v1/chat/stream", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {self.api_key}",
                     "Content-Type": "application/json", "Accept": "text/event-stream"})
        try:
            response = urllib.request.urlopen(request, timeout=CASE_TIMEOUT)
        except urllib.error.HTTPError as exc:
            result.error = _error_text(exc.read(), f"HTTP {exc.code}")
            return
        pieces: list[str] = []
        with response:
            event = ""
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "delta":
                        if result.first_token_ms is None:
                            result.first_token_ms = _ms_since(started)
                        pieces.append(data["text"])
                    elif event == "done":
                        result.total_ms = _ms_since(started)
                        usage = data.get("usage", {})
                        result.prompt_tokens = usage.get("prompt_tokens", 0)
                        result.completion_tokens = usage.get("completion_tokens", 0)
                        result.cost_usd = _decimal(usage.get("cost_usd"))
                        break
                    elif event == "error":
                        result.error = _error_text(json.dumps(data).encode(), "error")
                        break
        result.text = "".join(pieces)
        if not result.error and result.total_ms is None:
            result.error = "the stream ended without done"

    def _check(self, case: Case, result: CaseResult) -> list[str]:
        text, checks, failures = result.text, case.checks, []
        for needle in checks.get("contains", ()):
            if needle not in text:
                failures.append(f"contains: {needle!r} is not in the reply")
        for needle in checks.get("not_contains", ()):
            if needle in text:
                failures.append(f"not_contains: {needle!r} is in the reply")
        if "regex" in checks and not re.search(checks["regex"], text):
            failures.append(f"regex: {checks['regex']!r} does not match the reply")
        if "equals" in checks and text.strip() != checks["equals"].strip():
            failures.append("equals: the reply differs")
        if case.schema is not None:
            problem = case.schema.reply_error(text)
            if problem:
                failures.append(f"json_schema: {problem}")
        limit = checks.get("max_first_token_ms")
        if limit is not None and (result.first_token_ms is None or result.first_token_ms > limit):
            failures.append(f"max_first_token_ms: {result.first_token_ms} ms > {limit} ms")
        limit = checks.get("max_total_ms")
        if limit is not None and (result.total_ms is None or result.total_ms > limit):
            failures.append(f"max_total_ms: {result.total_ms} ms > {limit} ms")
        if "judge" in checks:
            failures.extend(self._judge(checks["judge"], text))
        return failures

    def _judge(self, criteria: str, reply: str) -> list[str]:
        """Ask the judge model, through the same chain, for PASS or FAIL and a reason."""
        verdict = CaseResult(Case(0, "judge", {}, (), {}))
        self._stream_judge(criteria, reply, verdict)
        if verdict.error:
            return [f"judge: the judge model failed: {verdict.error}"]
        answer = verdict.text.strip()
        word = re.match(r"[A-Za-z]+", answer)
        if word and word.group(0).upper() == "PASS":
            return []
        if word and word.group(0).upper() == "FAIL":
            return [f"judge: {answer[4:].lstrip(' :.-') or 'failed'}"]
        return [f"judge: the judge answered neither PASS nor FAIL: {answer[:200]!r}"]

    def _stream_judge(self, criteria: str, reply: str, verdict: CaseResult) -> None:
        body = {"model": self.judge_model, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Criteria:\n{criteria}\n\nReply:\n{reply}"}]}
        try:
            self._stream(body, verdict)
        except OSError as exc:
            verdict.error = str(exc)


def regressions(candidate: VersionRun, baseline: VersionRun) -> list[CaseResult]:
    """The candidate's results of cases that passed on the baseline and fail on it."""
    return [mine for mine, theirs in zip(candidate.results, baseline.results, strict=True)
            if theirs.passed and not mine.passed]


def cases_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def table(runs: Sequence[VersionRun]) -> str:
    """One row per version, side by side."""
    head = ("VERSION", "CASES", "PASSED", "PASS_RATE", "FIRST_TOKEN_P50_MS", "TOTAL_P50_MS",
            "TOKENS", "COST_USD")
    rows = [head]
    for run in runs:
        s = run.summary()
        rows.append((f"{run.version} ({run.label})" if run.label else str(run.version),
                     str(s["cases"]), str(s["passed"]), f"{s['pass_rate']:.3f}",
                     _dash(s["first_token_p50_ms"]), _dash(s["total_p50_ms"]),
                     str(s["prompt_tokens"] + s["completion_tokens"]), _dash(s["cost_usd"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip() for row in rows)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(value) if isinstance(value, str) and value else None
    except InvalidOperation:
        return None


def _error_text(raw: bytes, fallback: str) -> str:
    try:
        error = json.loads(raw)["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return fallback
