"""The readiness probe the kubelet runs in a `kiri serve` container: an exec probe that prints why the server
is not ready, so that the reason reaches the kubelet's Event and, from there, the ModelDeployment's status.

The kubelet's httpGet prober keeps only the status code ("HTTP probe failed with statuscode: 503") and
drops the body, where `kiri serve` says why (`{"ready": false, "reason": "..."}`). An exec probe's output is
kept: the kubelet records it in a Warning Event on the pod, reason `Unhealthy`, message
`Readiness probe failed: <output>` (the first 10 KiB), which the operator reads (`PROBE_FAILED` below) and
quotes in the ModelDeployment's conditions.

The probe is stdlib Python run with `-I -S` (no site-packages, no Kiri import), so it needs nothing but the
image's `python3` (first on the PATH of Kiri's images: the venv's) and costs about 40 ms of CPU per run
(measured: `kiri --help`, which builds the whole CLI, costs 0.4 s). It asks the server on 127.0.0.1, inside
the pod's network namespace, exactly what the httpGet probe asked.
"""

from __future__ import annotations

PATH = "/v2/health/ready"
REASON_LIMIT = 1000
"""Characters of the reason printed: an Event message is capped (1 KiB in events.k8s.io), and a condition
message quotes it whole."""

PROBE_FAILED = "Readiness probe failed: "
"""How the kubelet's prober starts the Event message of a failed readiness probe (pkg/kubelet/prober)."""

# Run as `python3 -I -S -c SOURCE PORT`: exit 0 when ready, else 1 with one line saying why.
SOURCE = f"""\
import http.client, json, sys
port = int(sys.argv[1])
try:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
    conn.request("GET", "{PATH}")
    reply = conn.getresponse()
    body = reply.read(65536)
except (OSError, http.client.HTTPException) as exc:
    print(f"kiri serve does not answer on port {{port}}: {{exc}}"[:{REASON_LIMIT}])
    sys.exit(1)
if reply.status == 200:
    sys.exit(0)
try:
    reason = str(json.loads(body).get("reason") or "")
except (ValueError, AttributeError):
    reason = ""
print((reason or f"HTTP {{reply.status}} from {PATH}").replace("\\n", " ")[:{REASON_LIMIT}])
sys.exit(1)
"""


def command(port: int) -> list[str]:
    """The exec probe's command for a server on `port`."""
    return ["python3", "-I", "-S", "-c", SOURCE, str(port)]


def reason_from_event(message: str) -> str | None:
    """The probe's output in a kubelet Event message, or None when the Event is about something else (a
    liveness probe, a probe that could not run). The event aggregator's prefix is dropped."""
    message = message.removeprefix("(combined from similar events): ")
    if not message.startswith(PROBE_FAILED):
        return None
    return message.removeprefix(PROBE_FAILED).strip() or None
