"""The generative act of `make demo` (hack/demo.sh, through hack/demo.py): a tiny LLaMA-family chat model built and
trained here (never downloaded), the compression manifest of its ModelDeployment, and chat requests to the edge
`kiri serve` in cascade mode: the edge answers while it is sure, the cloud continues a hard answer.

    python hack/demo.py lm-build --out DIR
    python hack/demo.py chat --url EDGE_URL --model NAME --where TEXT

Every number printed comes from the run: the model is tests/lm_fixture.py's (trained on six standard-library
modules and chat turns made from their docstrings, cached by content hash under ${KIRI_CACHE:-~/.cache/kiri}), the
tokens per tier are the `usage.kiri` of each answer, checked against the edge's own `kiri:collab_tokens_total`.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# The model was trained on standard-library source: a chat turn that opens a function of its training text is in
# its domain and the int4 edge stays sure of every token; a request far from anything it saw is hard: the edge
# starts, turns unsure within a few tokens, and the cloud continues (measured on this model: margin uncertainty,
# threshold 0.95, 24 tokens; the edge alone 24/24 and 11/11 tokens for the easy two, 4 of 24 for the hard one).
EASY = (
    "def fnmatch(name, pat):",
    "def heappush(heap, item):",
)
HARD = "Write a haiku about the sea."


# ---- the model --------------------------------------------------------------------------------------------------


def eval_rows() -> list[dict[str, Any]]:
    """What the variants are gated on: eight texts of a training module and two chats (as the LM tests do)."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    lines = src.read_text(encoding="utf-8").splitlines()
    texts = ["\n".join(lines[i : i + 6]) for i in range(40, 40 + 8 * 12, 12)]
    chats = [
        [
            {"role": "user", "content": "What does def dedent do?"},
            {"role": "assistant", "content": "Remove any common leading"},
        ],
        [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x + 1"}],
    ]
    return [{"text": t} for t in texts if t.strip()] + [{"messages": m} for m in chats]


def cmd_lm_build(args: argparse.Namespace, record: Callable[[str, Any], None]) -> int:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from safetensors.numpy import load_file

    import lm_fixture
    from kiri_runtime.compressing.lm import packing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = set(lm_fixture.cache_root().glob("llama-*"))
    started = time.monotonic()
    hf_dir = lm_fixture.tiny_llama()
    seconds = time.monotonic() - started
    how = "cached by content hash" if hf_dir in before else f"trained here in {seconds:.0f}s"
    sha, size = packing.pack(hf_dir, out / "source.tar")
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows()), encoding="utf-8")
    config = json.loads((hf_dir / "config.json").read_text())
    fixture = json.loads((hf_dir / "fixture.json").read_text())
    params = sum(int(t.size) for t in load_file(str(hf_dir / "model.safetensors")).values())
    info = {
        "sha256": sha,
        "path": str(out / "source.tar"),
        "size_bytes": size,
        "parameters": params,
        "loss": fixture["final_loss"],
        "built": how,
    }
    (out / "model.json").write_text(json.dumps(info, indent=2))
    print(
        f"  {config['architectures'][0]}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"vocab {config['vocab_size']}, {params / 1e6:.2f}M parameters; trained on six standard-library modules "
        f"and chat turns from their docstrings, final loss {fixture['final_loss']:.2f} ({how})"
    )
    print(
        f"  source: {out / 'source.tar'} (a Hugging Face checkpoint directory as a tar), sha256 {sha[:16]}..."
    )
    record("lm-model", info)
    return 0


def print_lm_variants(manifest: Any, table: Callable[..., str]) -> list[dict[str, Any]]:
    """The LM manifest as a table (fidelity against the fp32 build, size, decode speed); what the summary records."""
    base = manifest.baseline
    base_tps = base.decode.decode_tokens_per_s if base.decode else None
    print(
        f"  full model (onnxruntime-genai fp32 build, checked against HF transformers): "
        f"{base.size_bytes / 1024:.0f} KiB" + (f", {base_tps:.0f} tok/s decode" if base_tps else "")
    )
    rows, recorded = [], []
    for v in manifest.variants:
        g = v.generative
        tps = v.decode.decode_tokens_per_s if v.decode else None
        verdict = "accepted" if v.accepted else f"REJECTED ({v.reason})"
        rows.append(
            [
                v.name,
                v.method,
                f"{g.kl_mean:.4f}" if g else "-",
                f"{g.top1_agreement:.3f}" if g else "-",
                f"{g.perplexity_ratio:.3f}" if g else "-",
                f"{g.greedy_match:.2f}" if g and g.greedy_match is not None else "-",
                f"{v.size_bytes / 1024:.0f} KiB" if v.size_bytes else "-",
                f"{v.size_ratio_vs_fp32:.2f}x" if v.size_ratio_vs_fp32 else "-",
                f"{tps:.0f} ({tps / base_tps:.2f}x)" if tps and base_tps else "-",
                verdict,
            ]
        )
        recorded.append(
            {
                "name": v.name,
                "method": v.method,
                "kl_mean": g.kl_mean if g else None,
                "top1": g.top1_agreement if g else None,
                "size_bytes": v.size_bytes,
                "size_ratio": v.size_ratio_vs_fp32,
                "accepted": v.accepted,
                "uri": v.uri,
                "sha256": v.sha256,
            }
        )
    headers = ["VARIANT", "METHOD", "KL", "TOP1", "PPL RATIO", "GREEDY", "SIZE", "VS FP32", "TOK/S", "GATE"]
    print(table(headers, rows))
    return recorded


# ---- chat ---------------------------------------------------------------------------------------------------


def collab_tokens(metrics_text: str, model: str) -> dict[str, float]:
    """`kiri:collab_tokens_total` of `model` by tier, from a Prometheus text exposition (`_created` ignored)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("kiri:collab_tokens_total{"):
            continue
        labels_part, _, value = line.rpartition(" ")
        labels = dict(
            item.split("=", 1) for item in labels_part[labels_part.index("{") + 1 : -1].split(",") if item
        )
        if labels.get("model", "").strip('"') != model:
            continue
        tier = labels.get("tier", "").strip('"')
        out[tier] = out.get(tier, 0.0) + float(value)
    return out


def tier_totals(reports: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Tokens per tier over answers' `usage.kiri` reports."""
    return {
        "edge": sum(int(r.get("edge_tokens", 0)) for r in reports),
        "cloud": sum(int(r.get("cloud_tokens", 0)) for r in reports),
    }


def tokens_by_tier_table(
    answers: Mapping[str, int], metrics: Mapping[str, float], table: Callable[..., str]
) -> tuple[str, list[str]]:
    """The tokens-by-tier table, and the disagreements between the answers and the edge's metrics (none: empty)."""
    total = sum(answers.values()) or 1
    rows, problems = [], []
    for tier in ("edge", "cloud"):
        counted = metrics.get(tier, 0.0)
        rows.append(
            [tier, answers.get(tier, 0), f"{counted:.0f}", f"{100 * answers.get(tier, 0) / total:.0f} %"]
        )
        if counted != answers.get(tier, 0):
            problems.append(f"{tier}: the answers say {answers.get(tier, 0)} tokens, /metrics {counted:.0f}")
    rows.append(["total", sum(answers.values()), f"{sum(metrics.values()):.0f}", "100 %"])
    return table(["TIER", "TOKENS (usage.kiri)", "TOKENS (edge /metrics)", "SHARE"], rows), problems


def ask(client: Any, model: str, prompt: str, mode: str, max_tokens: int) -> tuple[dict[str, Any], float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "kiri": {"collaboration": mode},
    }
    started = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=body)
    ms = (time.perf_counter() - started) * 1000
    if resp.status_code != 200:
        raise RuntimeError(f"{mode} chat {prompt!r}: HTTP {resp.status_code} {resp.text[:300]}")
    return resp.json(), ms


def _short(text: str, width: int = 46) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def cmd_chat(args: argparse.Namespace, record: Callable[[str, Any], None], table: Callable[..., str]) -> int:
    import httpx

    rows, reports = [], []
    results: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=args.url, timeout=120) as client:
        for label, prompt in [*(("in domain", p) for p in EASY), ("hard", HARD)]:
            answer, ms = ask(client, args.model, prompt, "cascade", args.max_tokens)
            kiri = answer["usage"]["kiri"]
            reports.append(kiri)
            results[prompt] = kiri
            rows.append(
                [
                    label,
                    _short(prompt, 36),
                    _short(answer["choices"][0]["message"]["content"]),
                    kiri["edge_tokens"],
                    kiri["cloud_tokens"],
                    kiri["cloud_passes"],
                    kiri.get("handoff_reason") or "-",
                    f"{ms:.0f}",
                ]
            )
        print(f"  cascade (the edge hands off when its uncertainty passes the threshold); {args.where}")
        headers = ["KIND", "PROMPT", "ANSWER", "EDGE TOK", "CLOUD TOK", "CLOUD PASSES", "HANDOFF", "MS"]
        print(table(headers, rows))

        # The hard one again: cloud-only (the reference) and speculative (lossless: same text, fewer cloud passes).
        ref, ref_ms = ask(client, args.model, HARD, "cloud-only", args.max_tokens)
        spec, spec_ms = ask(client, args.model, HARD, "speculative", args.max_tokens)
        reports += [ref["usage"]["kiri"], spec["usage"]["kiri"]]
        sk = spec["usage"]["kiri"]
        same = spec["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
        n = spec["usage"]["completion_tokens"]
        print(
            f"  the hard one, speculative: {n} tokens ({sk['edge_tokens']} drafted at the edge and accepted, "
            f"{sk['cloud_tokens']} from the cloud) in {sk['cloud_passes']} cloud passes "
            f"({sk['cloud_passes'] / max(1, n):.2f} per token), acceptance "
            f"{sk['accepted_tokens']}/{sk['draft_tokens']}; text equal to cloud-only: {'yes' if same else 'NO'} "
            f"({spec_ms:.0f} ms vs {ref_ms:.0f} ms cloud-only)"
        )
        metrics = collab_tokens(client.get("/metrics").text, args.model)

    answers = tier_totals(reports)
    text, problems = tokens_by_tier_table(answers, metrics, table)
    print("  tokens by tier, every answer above (cascade, cloud-only, speculative):")
    print(text)
    record(
        "chat",
        {"where": args.where, "tokens": answers, "hard": results[HARD], "speculative_exact": same},
    )
    failures = list(problems)
    failures += [f"easy prompt {p!r} made no edge tokens" for p in EASY if not results[p]["edge_tokens"]]
    if not results[HARD]["cloud_tokens"]:
        failures.append(f"the hard prompt {HARD!r} was not continued by the cloud: {results[HARD]}")
    if not ref["usage"]["kiri"]["cloud_tokens"]:
        failures.append(
            f"the cloud-only answer has no cloud tokens (cloud tier down?): {ref['usage']['kiri']}"
        )
    if not same:
        failures.append("speculative text differs from cloud-only (greedy speculative decoding is lossless)")
    for f in failures:
        print(f"  {f}", file=sys.stderr)
    return 1 if failures else 0


# ---- without real nodes: the operator's pods as host processes ------------------------------------------------


def host_serve_args(
    args: Sequence[str], port: int, cache_dir: str, cloud_url: str | None = None, threads: int = 1
) -> list[str]:
    """The `kiri serve` args the operator rendered into a pod, for a process on this host: its own address, cache
    directory and thread count, and the cloud tier at `cloud_url` instead of the cloud Service (kwok nodes run
    no containers, and a host process cannot resolve a Service name). Everything else (the model URI and
    sha256, the variant, the collaboration flags) stays as the operator wrote it."""
    replace = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--cache-dir": cache_dir,
        "--threads": str(threads),
    }
    if cloud_url is not None:
        replace["--fallback-url"] = cloud_url
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        if flag in replace and i + 1 < len(args):
            out += [flag, replace.pop(flag)]
            i += 2
            continue
        out.append(flag)
        i += 1
    if "--fallback-url" in replace:
        raise ValueError(
            f"no --fallback-url in {' '.join(args)}: the edge has no cloud tier to point at {cloud_url}"
        )
    for flag in ("--host", "--port", "--cache-dir", "--threads"):
        if flag in replace:
            out += [flag, replace.pop(flag)]
    return out


def rendered_serve_args(namespace: str, name: str, tier: str) -> list[str]:
    """The `kiri serve` args of the ModelDeployment's cloud Deployment, or of its edge DaemonSet of the update
    revision, as the operator applied them."""
    import subprocess

    def get(*what: str) -> Any:
        proc = subprocess.run(
            ["kubectl", "get", *what, "-n", namespace, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl get {' '.join(what)}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    if tier == "cloud":
        obj = get("deployment", f"{name}-cloud")
    else:
        revision = get("modeldeployment", name).get("status", {}).get("updateRevision")
        sel = f"kiri.dev/modeldeployment={name},app.kubernetes.io/component=edge,kiri.dev/revision={revision}"
        items = get("daemonsets", "-l", sel)["items"]
        if not items:
            raise RuntimeError(f"no edge DaemonSet of {name} at revision {revision}")
        obj = items[0]
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def cmd_lm_host_args(args: argparse.Namespace) -> int:
    """One arg a line: `kiri <args>` runs the operator's `tier` pod of the chat model as a host process."""
    rendered = rendered_serve_args(args.namespace, args.name, args.tier)
    print("\n".join(host_serve_args(rendered, args.port, args.cache_dir, args.cloud_url)))
    return 0


def register(sub: Any, record: Callable[[str, Any], None], table: Callable[..., str]) -> None:
    p = sub.add_parser("lm-host-args")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--tier", choices=("edge", "cloud"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--cloud-url", help="edge: the cloud process's URL, in place of the cloud Service")
    p.set_defaults(fn=cmd_lm_host_args)
    p = sub.add_parser("lm-build")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=lambda a: cmd_lm_build(a, record))
    p = sub.add_parser("chat")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--where", required=True, help="where the edge and cloud run (printed)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.set_defaults(fn=lambda a: cmd_chat(a, record, table))
