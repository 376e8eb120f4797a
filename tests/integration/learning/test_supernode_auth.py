"""SuperNode authentication with real Flower processes: a SuperLink started as the operator starts it
(`--enable-supernode-auth --supernode-public-keys`, the sites' public keys) and a SuperNode per site signing
with its own site's key. Only those join: a SuperNode with a key nobody registered, one with no key, and one
presenting a site's key while that site is connected are all refused, and registering a key of one's own
through the Control API (`flwr supernode register`, which needs no account on Flower without account
authentication) is refused too.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_harness import Federation, env

from kiri_runtime.learning import launching, node_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ("site-a", "site-b")
JOIN_SECONDS = 240  # SuperNodes start Python and Flower's apps: slow on a loaded 2-core box


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("flower-auth")
    fed = Federation(root, {site: root / f"{site}.npz" for site in SITES}).start()
    try:
        yield fed
    finally:
        fed.stop()


def _cli(fed: Federation, *args: str, address: str | None = None) -> subprocess.CompletedProcess[str]:
    """`flwr ARGS` against the Control API (or `address`)."""
    home = launching.write_home(
        fed.root / f"flwr-home-{address or 'control'}", address or fed.control, fed.ca
    )
    return subprocess.run(
        [launching.flwr_command(), *args],
        env={**env(), "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _nodes(fed: Federation) -> dict[int, str]:
    """node id -> status, as `flwr supernode ls` shows them."""
    done = _cli(fed, "supernode", "ls", launching.CONNECTION, "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return {int(n["node-id"]): n["status"] for n in json.loads(done.stdout)["nodes"]}


def _registered(fed: Federation) -> dict[str, int]:
    text = fed.log_text("superlink")
    return {m[1]: int(m[2]) for m in re.finditer(r"registered SuperNode of site (\S+) as node (\d+)", text)}


def _online(fed: Federation) -> dict[str, int]:
    """site -> the node id its own SuperNode joined as (its log), once it has joined."""
    out = {}
    for site in SITES:
        m = re.search(r"SuperNode ID: (\d+)", fed.log_text(f"supernode-{site}"))
        if m:
            out[site] = int(m[1])
    return out


@pytest.fixture(scope="module")
def joined(federation: Federation) -> dict[str, int]:
    end = time.monotonic() + JOIN_SECONDS
    while time.monotonic() < end:
        online = _online(federation)
        if len(online) == len(SITES) and set(_nodes(federation).values()) == {"online"}:
            return online
        time.sleep(2)
    raise AssertionError(f"the sites' SuperNodes did not join:\n{federation.tail()}")


def _refused(fed: Federation, name: str, site: str, key: Path | None) -> str:
    proc = fed.start_supernode(name, site, key)
    try:
        code = proc.wait(timeout=JOIN_SECONDS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} was not refused:\n{fed.tail()}") from None
    text = fed.log_text(name)
    assert code != 0, text
    assert "Failed to initialize the connection to the SuperLink" in text
    assert "SuperNode ID:" not in text
    return text


def test_the_superlink_registers_exactly_the_sites_public_keys_and_each_sites_supernode_joins_as_its_site(
    federation: Federation, joined: dict[str, int]
) -> None:
    registered = _registered(federation)
    assert sorted(registered) == list(SITES)
    assert joined == registered  # each SuperNode joined as the node registered under its own site's name
    assert _nodes(federation) == {registered[site]: "online" for site in SITES}
    # The process that starts each round's ServerApp (Flower's SuperExec, the SuperLink's child) inherits
    # which node is which site, so a round admits a node only as its registered site.
    link = federation.procs[0].pid
    children = [
        int(c) for t in Path(f"/proc/{link}/task").iterdir() for c in (t / "children").read_text().split()
    ]
    environments = [
        dict(v.split("=", 1) for v in Path(f"/proc/{c}/environ").read_text().split("\0") if "=" in v)
        for c in children
    ]
    (sites_file,) = {e[node_keys.SITES_ENV] for e in environments if node_keys.SITES_ENV in e}
    assert json.loads(Path(sites_file).read_text()) == {str(node): site for site, node in registered.items()}


def test_a_supernode_whose_key_nobody_registered_cannot_join(
    federation: Federation, joined: dict[str, int]
) -> None:
    stranger = federation.root / "stranger.key"
    stranger.write_bytes(node_keys.make().private_key)
    stranger.chmod(0o600)
    text = _refused(federation, "supernode-stranger", "site-c", stranger)
    assert "Failed to activate SuperNode" in text
    assert _nodes(federation) == {joined[site]: "online" for site in SITES}


def test_a_supernode_without_a_key_cannot_register_itself(
    federation: Federation, joined: dict[str, int]
) -> None:
    text = _refused(federation, "supernode-keyless", "site-c", None)
    assert "SuperNode authentication is enabled" in text
    assert _nodes(federation) == {joined[site]: "online" for site in SITES}


def test_a_supernode_presenting_a_connected_sites_key_cannot_join_as_that_site(
    federation: Federation, joined: dict[str, int]
) -> None:
    _refused(federation, "supernode-impostor", "site-b", federation.keys["site-a"])
    assert f"SuperNode with node ID {joined['site-a']} could not be activated" in federation.log_text(
        "superlink"
    )
    assert _nodes(federation) == {joined[site]: "online" for site in SITES}


def test_registering_a_key_of_ones_own_through_the_control_api_is_refused(
    federation: Federation, joined: dict[str, int]
) -> None:
    pair = node_keys.make()
    public = federation.root / "intruder.pub"
    public.write_bytes(pair.public_key)
    done = _cli(federation, "supernode", "register", str(public), launching.CONNECTION)
    assert done.returncode != 0
    assert "SuperNode registration is closed on this SuperLink" in " ".join(
        (done.stdout + done.stderr).split()
    )
    for site in SITES:  # nor can a registered site be removed
        gone = _cli(federation, "supernode", "unregister", str(joined[site]), launching.CONNECTION)
        assert gone.returncode != 0
    assert _nodes(federation) == {joined[site]: "online" for site in SITES}


def test_the_control_api_answers_on_its_own_port_and_not_on_the_fleet_port_the_supernodes_reach(
    federation: Federation, joined: dict[str, int]
) -> None:
    # On the Fleet API's port (where the SuperNodes connect, and which the NetworkPolicy opens to them),
    # no Control API: not listing nodes, nor submitting or stopping a run.
    refused = _cli(federation, "supernode", "ls", launching.CONNECTION, address=federation.superlink)
    assert refused.returncode != 0
    port = federation.control.rsplit(":", 1)[1]
    assert f"served on its port {port} only" in " ".join((refused.stdout + refused.stderr).split())
    # On its own port it answers, over the same TLS certificate.
    assert _nodes(federation) == {joined[site]: "online" for site in SITES}
