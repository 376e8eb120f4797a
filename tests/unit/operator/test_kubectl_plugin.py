"""The CLI as kubectl users expect it: `kubectl kiri`, kubectl's flags, `-o json|yaml`, `kiri wait` and its
exit codes (driven by a watch, never by sleeping), and shell completion."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from gitops_health import TESTDATA
from kiri_operator import cli, rollout_commands
from kiri_operator.rollout_views import (
    WAIT_OTHER_END,
    WAIT_REACHED,
    WAIT_TIMEOUT,
    as_list,
    dump,
    parse_duration,
    wait_verdict,
)

pytestmark = pytest.mark.timeout(30)


def recorded(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((TESTDATA / f"{name}.yaml").read_text()))


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("2.5", 2.5), ("1m30s", 90)]
)
def test_timeouts_are_spelled_as_kubectl_spells_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-1", "0s", "m"])
def test_bad_timeouts_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("name", "wait_for", "code"),
    [
        ("healthy", "healthy", WAIT_REACHED),
        ("healthy", "rolledback", WAIT_OTHER_END),
        ("rolled-back", "rolledback", WAIT_REACHED),
        ("rolled-back", "healthy", WAIT_OTHER_END),
        ("rolled-back-aborted", "rolledback", WAIT_REACHED),
        ("older-operator-rolled-back", "healthy", WAIT_OTHER_END),
        ("older-operator-healthy", "healthy", WAIT_REACHED),
        ("progressing-baking", "healthy", None),
        ("paused", "healthy", None),
        ("generation-not-observed", "healthy", None),
        ("just-applied", "healthy", None),
    ],
)
def test_wait_verdict_on_each_recorded_phase(name: str, wait_for: str, code: int | None) -> None:
    assert wait_verdict(recorded(name), wait_for)[0] == code


def test_a_rollback_tells_the_revision_it_went_back_to() -> None:
    md = recorded("rolled-back")
    code, why = wait_verdict(md, "healthy")
    assert code == WAIT_OTHER_END
    assert why.startswith(f"rolled back to {md['status']['currentRevision']} (ProgressDeadlineExceeded: ")


def test_output_is_kubectls_json_and_yaml_and_a_v1_list() -> None:
    md = recorded("healthy")
    assert json.loads(dump(md, "json")) == md
    assert yaml.safe_load(dump(md, "yaml")) == md
    listed = as_list([md])
    assert (listed["apiVersion"], listed["kind"], listed["items"]) == ("v1", "List", [md])


class FakeKube:
    """get() once, then the watch events given, per watch call; records the watches asked for."""

    def __init__(self, first: dict[str, Any] | None, watches: list[list[tuple[str, dict[str, Any]]]]) -> None:
        self.first = first
        self.watches = watches
        self.asked: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.first

    def watch(self, kind: str, namespace: str, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        self.asked.append(kw)
        yield from self.watches.pop(0) if self.watches else []


def run_wait(monkeypatch: pytest.MonkeyPatch, kube: FakeKube, *argv: str) -> int:
    monkeypatch.setattr(rollout_commands, "_kube", lambda args: kube)
    monkeypatch.setattr(rollout_commands.time, "sleep", lambda s: pytest.fail("wait must not poll"))
    return cli.main(["wait", "waves", "-n", "ns", *argv])


def _v(md: dict[str, Any], version: str) -> dict[str, Any]:
    md = json.loads(json.dumps(md))
    md["metadata"]["resourceVersion"] = version
    return md


def test_wait_follows_the_watch_from_the_objects_version_until_healthy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = FakeKube(
        _v(recorded("progressing-waiting-for-ready"), "10"),
        [
            [
                ("MODIFIED", _v(recorded("progressing-baking"), "11")),
                ("MODIFIED", _v(recorded("healthy"), "12")),
            ]
        ],
    )
    assert run_wait(monkeypatch, kube, "--for=healthy", "--timeout", "1m") == WAIT_REACHED
    assert kube.asked[0]["resource_version"] == "10" and kube.asked[0]["name"] == "waves"
    assert "healthy: revision" in capsys.readouterr().out


def test_wait_for_healthy_exits_1_on_a_rollback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = FakeKube(recorded("progressing-waiting-for-ready"), [[("MODIFIED", recorded("rolled-back"))]])
    assert run_wait(monkeypatch, kube, "--for=healthy") == WAIT_OTHER_END
    assert "will not be healthy: rolled back to" in capsys.readouterr().err


def test_wait_restarts_a_gone_watch_from_the_current_state(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube(
        _v(recorded("progressing-baking"), "5"),
        [[("ERROR", {"kind": "Status", "code": 410})], [("ADDED", _v(recorded("rolled-back"), "40"))]],
    )
    assert run_wait(monkeypatch, kube, "--for", "rolledback") == WAIT_REACHED
    assert [a["resource_version"] for a in kube.asked] == ["5", None]


def test_wait_times_out_with_exit_2_and_the_last_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = FakeKube(recorded("paused"), [])
    assert run_wait(monkeypatch, kube, "--timeout", "0.2s") == WAIT_TIMEOUT
    err = capsys.readouterr().err
    assert "timed out after 0.2s" in err and "Paused" in err


def test_wait_on_a_missing_or_deleted_object_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_wait(monkeypatch, FakeKube(None, [])) == WAIT_OTHER_END
    kube = FakeKube(recorded("progressing-baking"), [[("DELETED", recorded("progressing-baking"))]])
    assert run_wait(monkeypatch, kube) == WAIT_OTHER_END


def test_a_bad_for_is_a_usage_error_with_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["wait", "waves", "--for=available"])
    assert exc.value.code == WAIT_TIMEOUT


def test_status_watch_redraws_at_each_watch_event_without_polling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Lists(FakeKube):
        def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
            return []

    kube = Lists(recorded("progressing-baking"), [[("MODIFIED", recorded("healthy"))]])

    def stop(kind: str, namespace: str, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        kube.asked.append(kw)
        if len(kube.asked) > 1:
            raise KeyboardInterrupt
        yield from kube.watches.pop(0)

    monkeypatch.setattr(kube, "watch", stop)
    monkeypatch.setattr(rollout_commands, "_kube", lambda args: kube)
    monkeypatch.setattr(rollout_commands.time, "sleep", lambda s: pytest.fail("status -w must not poll"))
    assert cli.main(["status", "waves", "-n", "ns", "-w"]) == 0
    out = capsys.readouterr().out
    # the first state, the watch's event, and the redraw when that watch ended
    assert out.count("\033[2J") == 3
    assert "Progressing" in out.split("\033[2J")[1] and "✔ Healthy" in out.split("\033[2J")[2]


def test_kubectl_flags_are_accepted_by_every_cluster_command() -> None:
    parser = cli.build_parser()
    for argv in (
        ["get", "-A", "-o", "yaml", "--context", "prod", "--kubeconfig", "/k"],
        ["status", "waves", "-n", "ns", "-o", "json", "--context", "prod"],
        ["wait", "waves", "--for=rolledback", "--timeout=5m", "--context", "prod"],
        ["promote", "waves", "-n", "ns", "--context", "prod"],
    ):
        args = parser.parse_args(argv)
        assert args.context == "prod"


def test_the_kubectl_plugin_names_itself_kubectl_kiri(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.kubectl_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: kubectl kiri ")


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_scripts_know_the_subcommands_and_flags(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["completion", shell, "--prog", "kubectl-kiri"]) == 0
    script = capsys.readouterr().out
    assert "kubectl-kiri" in script
    # shtab's tcsh script completes subcommands and positional choices only, not each subcommand's flags
    words = ("status", "wait", "rollback") + (() if shell == "tcsh" else ("--context", "rolledback"))
    for word in words:
        assert word in script, word
