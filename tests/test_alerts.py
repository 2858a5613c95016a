"""Alert rules: promtool checks and unit tests, and the real Prometheus of the stack loading them."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from tools.processes import wait_until
from tools.stack import ALERT_RULES, LocalStack

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
RULES = yaml.safe_load(ALERT_RULES.read_text())
ALERTS = {rule["alert"]: rule["expr"] for group in RULES["groups"] for rule in group["rules"]}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=ALERT_RULES.parent, timeout=120)


@needs_promtool
def test_rules_are_valid() -> None:
    done = _promtool("check", "rules", ALERT_RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


@needs_promtool
def test_rules_fire_when_they_should_and_only_then() -> None:
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((ALERT_RULES.parent / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    assert tested == set(ALERTS)


def _get(stack: LocalStack, path: str, **params: str) -> dict:
    url = f"{stack.prometheus_url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.integration
def test_the_stacks_prometheus_loads_the_rules_and_evaluates_each(stack: LocalStack) -> None:
    if stack.prometheus_url is None:
        pytest.skip("prometheus is not installed")

    def loaded() -> dict:
        groups = _get(stack, "/api/v1/rules")["data"]["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    wait_until(lambda: set(loaded()) == set(ALERTS), 30, interval_s=1, what="Prometheus to load the rules")
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in loaded().values()), 30,
               interval_s=1, what="every rule to be evaluated once")
    for name, rule in loaded().items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    for name, expr in ALERTS.items():  # each expression also runs as a query on the real server
        assert _get(stack, "/api/v1/query", query=expr)["status"] == "success", name
