"""Evaluation runs (docs/prompt-lifecycle.md#evaluation-runs): `promptline prompts eval` through
the real chain against simulated models, the regression exit status, stored runs, the label
gate, and malformed cases files."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptline import cli
from tests.chain import Chain, chain_fixture

PRICE = {"input_per_mtok": "0.15", "output_per_mtok": 0.6}
FAST = {"ttft_ms": 0, "tokens_per_second": 0}
MODELS = [
    {"name": "good", "provider": "simulated", "price": PRICE,
     "simulated": {**FAST, "reply": "Hello Ada, nice to meet you."}},
    {"name": "rude", "provider": "simulated", "simulated": {**FAST, "reply": "Go away."}},
    {"name": "judge", "provider": "simulated", "simulated": {**FAST, "reply": "PASS: polite."}},
]
AUTH = {"Authorization": "Bearer dev-key"}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
          "additionalProperties": False}
CASES = [
    {"name": "greets", "variables": {"name": "Ada"}, "contains": ["Hello", "Ada"]},
    {"name": "polite", "not_contains": "away", "regex": r"^Hello\b", "max_total_ms": 10_000,
     "max_first_token_ms": 10_000},
    {"name": "judged", "judge": "The reply is polite."},
]


chain = chain_fixture(models=MODELS)



async def _prompt(chain: Chain, http: aiohttp.ClientSession, *models: str,
                  extra: dict[str, Any] | None = None) -> str:
    """A prompt with one version per model, in order: version 1 answers with models[0]."""
    pid = f"ev-{uuid.uuid4().hex[:10]}"
    for model in models:
        async with http.post(f"{chain.base_url}/v1/prompts/{pid}/versions", headers=AUTH,
                             json={"template": "Greet {{name}}.", "variables": ["name"],
                                   "model": model, **(extra or {})}) as resp:
            assert resp.status == 201, await resp.text()
    return pid


def _cases(tmp_path: Path, cases: list[Any], name: str = "cases.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(c if isinstance(c, str) else json.dumps(
        {"variables": {"name": "Ada"}, **c}) for c in cases) + "\n", encoding="utf-8")
    return str(path)


async def _cli(chain: Chain, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.main, ["--url", chain.base_url, *argv],
                                   env={"PROMPTLINE_API_KEY": "dev-key"}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def _put(chain: Chain, http: aiohttp.ClientSession, pid: str, body: Any
               ) -> tuple[int, Any]:
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/labels/prod", headers=AUTH,
                        json=body) as resp:
        return resp.status, await resp.json()


async def test_a_passing_run_is_stored_on_the_version(chain: Chain, http: aiohttp.ClientSession,
                                                       tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "good")
    report = tmp_path / "report.json"
    code, out, err = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--cases",
                                _cases(tmp_path, CASES), "--judge-model", "judge",
                                "--json", str(report), "--concurrency", "3")
    assert code == 0, (out, err)
    assert "3/3" in err and "[" in err  # the progress bar
    assert "VERSION" in out and "1.000" in out
    data = json.loads(report.read_text())
    (version,) = data["versions"]
    assert (version["cases"], version["passed"], version["pass_rate"]) == (3, 3, 1.0)
    assert version["cost_usd"] is not None and version["completion_tokens"] > 0
    async with http.get(f"{chain.base_url}/v1/prompts/{pid}/versions/1/evals",
                        headers=AUTH) as resp:
        runs = (await resp.json())["data"]
    assert [(r["cases"], r["passed"], r["pass_rate"], r["regressions"]) for r in runs] == [
        (3, 3, 1.0, 0)]
    assert runs[0]["eval_id"] == data["stored"]["eval_id"]
    assert runs[0]["cases_sha256"] == data["cases_sha256"]


async def test_a_regression_against_the_label_exits_1(chain: Chain, http: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "good", "rude")
    assert (await _put(chain, http, pid, {"version": 1}))[0] == 200
    code, out, err = await _cli(chain, "prompts", "eval", pid, "--version", "2", "--against",
                                "prod", "--cases", _cases(tmp_path, CASES[:2]), "--json", "-")
    assert code == 1, (out, err)
    data = json.loads(out)
    assert data["regressed"] is True
    assert [r["name"] for r in data["regressions"]] == ["greets", "polite"]
    assert [(v["version"], v["label"], v["passed"]) for v in data["versions"]] == [
        (2, None, 0), (1, "prod", 2)]
    failures = data["versions"][0]["results"][1]["failures"]
    assert any(f.startswith("not_contains: 'away'") for f in failures)
    assert data["stored"]["regressions"] == 2
    # the same cases on the label's own version: no regression
    code, out, _ = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--against",
                              "prod", "--cases", _cases(tmp_path, CASES[:2]), "--no-store")
    assert code == 0, out
    assert "1 (prod)" in out


async def test_failing_cases_json_schema_and_timing(chain: Chain, http: aiohttp.ClientSession,
                                                    tmp_path: Path) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    pid = await _prompt(chain, http, "good", extra={"response_format": fmt})
    cases = [{"name": "fits", "json_schema": SCHEMA},
             {"name": "does not fit", "json_schema": {"type": "array"}},
             {"name": "too slow", "max_first_token_ms": 0.001},
             {"name": "not equal", "equals": "nope"}]
    code, out, _ = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--cases",
                              _cases(tmp_path, cases), "--json", "-", "--no-store")
    assert code == 1  # without --against: any failed case
    results = {r["name"]: r for r in json.loads(out)["versions"][0]["results"]}
    assert results["fits"]["passed"] is True
    assert results["does not fit"]["failures"][0].startswith("json_schema: the reply does not "
                                                             "match the schema")
    assert results["too slow"]["failures"][0].startswith("max_first_token_ms:")
    assert results["not equal"]["failures"] == ["equals: the reply differs"]


async def test_the_judge_can_fail_a_case(chain: Chain, http: aiohttp.ClientSession,
                                         tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "good")
    # the "rude" model as the judge answers neither PASS nor FAIL
    code, out, _ = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--cases",
                              _cases(tmp_path, [{"judge": "polite"}]), "--judge-model", "rude",
                              "--json", "-", "--no-store")
    assert code == 1
    (result,) = json.loads(out)["versions"][0]["results"]
    assert result["failures"] == ["judge: the judge answered neither PASS nor FAIL: 'Go away.'"]


async def test_the_text_report_names_each_failed_case(chain: Chain, http: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "rude")
    code, out, _ = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--cases",
                              _cases(tmp_path, [{"name": "greets", "contains": "Hello"},
                                                {"contains": "Ada"}]), "--no-store")
    assert code == 1
    assert "FAIL version 1 line 1 (greets): contains: " in out, out
    assert "FAIL version 1 line 2: contains: " in out, out  # no name: the line alone


async def test_an_unknown_judge_model_stops_before_any_case(
        chain: Chain, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "good")
    code, out, err = await _cli(chain, "prompts", "eval", pid, "--version", "1", "--cases",
                                _cases(tmp_path, [{"judge": "polite"}]), "--judge-model",
                                "no-such-model", "--no-store")
    assert (code, out) == (2, "")
    assert "--judge-model 'no-such-model' is not a model this API key may use" in err, err
    assert "judge" in err.split("lists:")[1]  # what the key may use instead
    assert "0/1" not in err  # the run's progress bar never started: no case ran


async def test_the_label_gate(chain: Chain, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    pid = await _prompt(chain, http, "good", "good", "rude")
    assert (await _put(chain, http, pid, {"version": 1}))[0] == 200
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/policy", headers=AUTH,
                        json={"require_eval": True, "min_pass_rate": 0.9}) as resp:
        assert await resp.json() == {"object": "prompt_policy", "prompt_id": pid,
                                     "require_eval": True, "min_pass_rate": 0.9}
    status, body = await _put(chain, http, pid, {"split": {"1": 90, "2": 10}})
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert "version 2 has no passing eval run" in body["error"]["message"]
    # a failing run does not open the gate; a passing one does
    cases = _cases(tmp_path, CASES[:2])
    assert (await _cli(chain, "prompts", "eval", pid, "--version", "3", "--cases", cases))[0] == 1
    status, body = await _put(chain, http, pid, {"version": 3})
    assert status == 400 and "a best pass rate of 0" in body["error"]["message"]
    assert (await _cli(chain, "prompts", "eval", pid, "--version", "2", "--cases", cases))[0] == 0
    assert (await _put(chain, http, pid, {"split": {"1": 90, "2": 10}}))[0] == 200  # 1 serves
    # rollback is never gated
    async with http.post(f"{chain.base_url}/v1/prompts/{pid}/labels/prod/rollback",
                         headers=AUTH) as resp:
        assert resp.status == 200
    # --require-eval without a policy
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/policy", headers=AUTH,
                        json={"require_eval": False}) as resp:
        assert resp.status == 200
    code, _, err = await _cli(chain, "prompts", "label", pid, "prod", "3", "--require-eval")
    assert code == 1 and "version 3 has no passing eval run" in err
    assert (await _cli(chain, "prompts", "label", pid, "prod", "3"))[0] == 0


async def test_a_run_exactly_at_the_minimum_opens_the_gate(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    """2 of 3 cases against a min_pass_rate of 2/3: the threshold was rounded up to 666,667 ppm
    and the run down to 666,666, so a run exactly at the minimum was refused."""
    pid = await _prompt(chain, http, "good", "good")
    assert (await _put(chain, http, pid, {"version": 1}))[0] == 200
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/policy", headers=AUTH,
                        json={"require_eval": True, "min_pass_rate": 2 / 3}) as resp:
        assert resp.status == 200
    async with http.post(f"{chain.base_url}/v1/prompts/{pid}/versions/2/evals", headers=AUTH,
                         json={"cases": 3, "passed": 2}) as resp:
        assert resp.status == 201, await resp.text()
    status, body = await _put(chain, http, pid, {"version": 2})
    assert status == 200, body


@pytest.mark.parametrize(("lines", "message"), [
    (["{not json"], "line 1: not valid JSON"),
    ([{"contains": "x"}, {"contians": "x"}], "line 2: unknown field 'contians'"),
    ([{"contains": 3}], "line 1: contains must be a string or a list of strings"),
    ([{"regex": "("}], "line 1: regex is not a valid expression"),
    ([{"max_total_ms": -1}], "line 1: max_total_ms must be a positive number"),
    ([{"variables": {"name": 1}, "contains": "x"}], "line 1: variables must be an object"),
    ([{"messages": [{"role": "bot", "content": "x"}], "contains": "x"}],
     "line 1: messages[0] must be"),
    ([{"name": "nothing"}], "line 1: no assertion"),
    ([{"judge": "polite"}], "line 1: judge needs --judge-model"),
    ([{"json_schema": {"type": "nonsense"}}], "line 1: json_schema.json_schema.schema is not a "
                                              "valid JSON Schema"),
    (["# only a comment"], "no cases"),
])
async def test_malformed_cases_files_exit_2(chain: Chain, http: aiohttp.ClientSession,
                                            tmp_path: Path, lines: list[Any],
                                            message: str) -> None:
    code, out, err = await _cli(chain, "prompts", "eval", "any", "--version", "1", "--cases",
                                _cases(tmp_path, lines))
    assert (code, out) == (2, "")
    assert message in err, err


async def test_eval_runs_bad_input_over_http(chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = await _prompt(chain, http, "good")
    url = f"{chain.base_url}/v1/prompts/{pid}/versions"
    for version, body, status, message in [
        (1, {"cases": 2, "passed": 3}, 400, "passed must be at most cases"),
        (1, {"cases": 0, "passed": 0}, 400, "cases must be between 1"),
        (1, {"passed": 1}, 400, "cases and passed are required"),
        (1, {"cases": 1, "passed": 1, "cost_usd": "1e-3"}, 400, "cost_usd must be"),
        (1, {"cases": 1, "passed": 1, "colour": 1}, 400, "colour is not a field"),
        (9, {"cases": 1, "passed": 1}, 404, "has no version 9"),
    ]:
        async with http.post(f"{url}/{version}/evals", headers=AUTH, json=body) as resp:
            answer = await resp.json()
            assert resp.status == status, answer
            assert message in answer["error"]["message"]
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/policy", headers=AUTH,
                        json={"require_eval": True, "min_pass_rate": 2}) as resp:
        assert resp.status == 400
        assert "min_pass_rate must be between 0 and 1" in (await resp.json())["error"]["message"]
    async with http.post(f"{url}/1/evals", headers={"Authorization": "Bearer other-key"},
                         json={"cases": 1, "passed": 1}) as resp:
        assert resp.status == 403  # writes need an admin tenant
