"""`kiri serve` with LoRA adapters: the tiny LLaMA built LoRA-ready, adapters trained on two sites' text (lm_adapters.py),
picked per request through the model name, loaded, swapped and unloaded while requests run."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from runtime_helpers import ThreadedServer

from kiri_runtime.serving import AdapterSpec, ServeConfig
from lm_adapters import lora_genai, site_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = "s3cret-admin-token"
PROMPT = "The skipper"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ready() -> Path:
    return lora_genai()


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return {site: site_adapter(site) / f"{site}.onnx_adapter" for site in ("harbour", "orchard")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def start(ready: Path, files: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")

    def make(wait: bool = True, **over: Any) -> ThreadedServer:
        config = ServeConfig(
            model_uri=str(ready),
            name="assistant",
            host="127.0.0.1",
            port=0,
            cache_dir=tmp_path / f"cache{len(servers)}",
            threads=1,
            shutdown_grace_s=5.0,
            adapters=(AdapterSpec("harbour", files["harbour"].as_uri(), sha(files["harbour"])),),
            admin_token_file=token,
            adapter_roots=(files["orchard"].parent, tmp_path / "adapters"),
        )
        for key, value in over.items():
            setattr(config, key, value)
        servers.append(ThreadedServer(config).start())
        if wait:
            servers[-1].wait_ready(60)
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def raw_greedy(model_dir: Path, prompt: str, n: int, adapter: Path | None = None) -> list[int]:
    """A plain onnxruntime-genai greedy loop with the adapter file active: what the server must answer."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    ids = np.asarray(og.Tokenizer(model).encode(prompt), dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    g = og.Generator(model, params)
    adapters = og.Adapters(model)
    if adapter is not None:
        adapters.load(str(adapter), "a")
        g.set_active_adapter(adapters, "a")
    g.append_tokens(ids)
    out: list[int] = []
    while not g.is_done():
        g.generate_next_token()
        token = int(g.get_next_tokens()[0])
        out.append(token)
        if token == 2:
            break
    return out


def generate_ids(server: ThreadedServer, model: str, n: int = 24) -> list[int]:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": n, "temperature": 0, "details": True}}
    r = httpx.post(f"{server.url}/v2/models/{model}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["logprobs"]]


def complete(server: ThreadedServer, model: str, n: int = 24) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def admin(
    server: ThreadedServer, route: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/{route}", json=body, headers=ADMIN if headers is None else headers, timeout=60
    )


def metric(server: ThreadedServer, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def adapter_state(server: ThreadedServer) -> tuple[int, int]:
    """(adapters active, adapters onnxruntime-genai still holds)."""

    def look(s: Any) -> tuple[int, int]:
        adapters = s.rest.generation.schedulers["assistant"].adapters
        return len(adapters.listing()), adapters.loaded_keys()

    result: tuple[int, int] = server.call(look)
    return result


@pytest.mark.parametrize("mode", ["continuous", "cohort"])
def test_a_request_picks_its_adapter_through_the_model_name(
    start: Callable[..., ThreadedServer], ready: Path, files: dict[str, Path], mode: str
) -> None:
    server = start(lm_batching=mode)
    base = raw_greedy(ready, PROMPT, 24)
    harbour = raw_greedy(ready, PROMPT, 24, files["harbour"])
    assert base != harbour
    assert generate_ids(server, "assistant:harbour") == harbour[:24]
    assert generate_ids(server, "assistant") == base[:24]  # no default adapter: the base
    assert generate_ids(server, "assistant:base") == base[:24]
    text = complete(server, "assistant:harbour").json()
    assert text["model"] == "assistant:harbour" and text["choices"][0]["finish_reason"] in ("length", "stop")


def test_with_continuous_batching_adapter_requests_decode_in_generators_beside_the_base_models_rows(
    start: Callable[..., ThreadedServer], ready: Path, files: dict[str, Path]
) -> None:
    server = start(
        delay_ms=50.0, default_adapter="harbour"
    )  # 24 tokens take 1.2 s or more: the requests overlap
    assert server.server is not None
    scheduler = server.server.rest.generation.schedulers["assistant"]
    decoder = scheduler.decoder
    # The LoRA-ready build's adapter inputs have empty defaults: the continuous decoder takes it and decodes the base.
    assert scheduler.batching == "continuous" and decoder is not None
    prefilled: list[int] = []  # rows of every prefill
    beside: list[int] = []  # adapter generators live at every decode step of the rows
    prefill, step = decoder.prefill, decoder.step

    def recording_prefill(prompts: Any, lengths: Any) -> Any:
        prefilled.append(len(prompts))
        return prefill(prompts, lengths)

    def recording_step(tokens: Any) -> Any:
        beside.append(len(scheduler._cohorts))
        return step(tokens)

    decoder.prefill = recording_prefill  # type: ignore[method-assign]
    decoder.step = recording_step  # type: ignore[method-assign]
    base = raw_greedy(ready, PROMPT, 24)
    harbour = raw_greedy(ready, PROMPT, 24, files["harbour"])
    models = ["assistant:base", "assistant", "assistant:harbour"]  # the bare name gets the default adapter
    results: dict[int, list[int]] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, generate_ids(server, models[i])))
        for i in range(3)
    ]
    threads[0].start()
    deadline = time.monotonic() + 30
    while not prefilled and time.monotonic() < deadline:  # the base request is a row before the others come
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: base[:24], 1: harbour[:24], 2: harbour[:24]}
    assert prefilled == [1]  # only the base request became a row
    assert any(beside)  # the rows stepped while the adapter's generator was decoding


def test_the_default_adapter_answers_the_bare_model_name_and_base_asks_for_none(
    start: Callable[..., ThreadedServer], ready: Path, files: dict[str, Path]
) -> None:
    server = start(default_adapter="harbour")
    assert generate_ids(server, "assistant") == raw_greedy(ready, PROMPT, 24, files["harbour"])[:24]
    assert generate_ids(server, "assistant:base") == raw_greedy(ready, PROMPT, 24)[:24]
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [
        ("assistant", None),
        ("assistant:harbour", "assistant"),
    ]
    entry = models[1]
    assert entry["root"] == files["harbour"].as_uri()
    assert entry["kiri"] == {
        "adapter": "harbour",
        "sha256": sha(files["harbour"]),
        "rank": 8,  # q_proj and v_proj at rank 4, stacked in the fused q|k|v projection
        "bytes": 4 * 2 * (128 * 8 + 8 * 256),
        "default": True,
    }


def test_a_default_adapter_that_is_not_loaded_keeps_the_server_unready(
    start: Callable[..., ThreadedServer],
) -> None:
    server = start(wait=False, default_adapter="orchard")
    time.sleep(3)
    r = httpx.get(f"{server.url}/v2/health/ready")
    assert r.status_code == 503
    assert "adapter orchard is not loaded" in r.json()["reason"]


def test_the_openai_client_streams_from_an_adapter(
    start: Callable[..., ThreadedServer], ready: Path, files: dict[str, Path]
) -> None:
    import onnxruntime_genai as og

    server = start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.completions.create(
            model="assistant:harbour", prompt=PROMPT, max_tokens=16, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tok = og.Tokenizer(og.Model(str(ready)))
    expected = raw_greedy(ready, PROMPT, 16, files["harbour"])
    assert text == tok.decode(np.asarray([t for t in expected if t != 2], dtype=np.int32))
    assert {c.model for c in chunks} == {"assistant:harbour"}


def test_an_unknown_adapter_is_a_404_and_the_server_keeps_serving(
    start: Callable[..., ThreadedServer],
) -> None:
    server = start()
    r = complete(server, "assistant:nowhere")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "adapter 'nowhere' is not loaded" in r.json()["error"]["message"]
    g = httpx.post(f"{server.url}/v2/models/assistant:nowhere/generate", json={"text_input": "x"})
    assert g.status_code == 404
    assert complete(server, "assistant:harbour").status_code == 200
    requests = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("kiri_requests_total{") and 'code="5' in line:
            requests += float(line.rsplit(" ", 1)[1])
    assert requests == 0


def test_admin_routes_are_off_without_a_token_and_refuse_a_wrong_one(
    start: Callable[..., ThreadedServer], files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KIRI_ADMIN_TOKEN", raising=False)
    server = start(admin_token_file=None)
    body = {"lora_name": "orchard", "lora_path": files["orchard"].as_uri()}
    off = admin(server, "load_lora_adapter", body)
    assert off.status_code == 403 and "admin routes are off" in off.json()["error"]["message"]
    server = start()
    assert admin(server, "load_lora_adapter", body, headers={}).status_code == 401
    wrong = admin(server, "load_lora_adapter", body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert adapter_state(server) == (1, 1)
    assert admin(server, "load_lora_adapter", body).status_code == 200
    assert adapter_state(server) == (2, 2)
    assert metric(server, "kiri:lora_adapters", model="assistant") == 2


def test_bad_adapters_and_bad_admin_requests_are_4xx_and_lose_nothing(
    start: Callable[..., ThreadedServer], files: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    server = start()
    (tmp_path / "adapters").mkdir()
    garbage = tmp_path / "adapters" / "garbage.onnx_adapter"
    garbage.write_bytes(b"\x00not an adapter" * 10)
    misfit = tmp_path / "adapters" / "misfit.onnx_adapter"
    # A file outside the adapter directories, named directly and through a link inside one.
    outside = tmp_path / "outside.onnx_adapter"
    outside.write_bytes(files["orchard"].read_bytes())
    (tmp_path / "adapters" / "link.onnx_adapter").symlink_to(outside)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(
        {
            "model.layers.0.attn.qkv_proj.lora_A": ort.OrtValue.ortvalue_from_numpy(
                np.zeros((64, 2), np.float32)
            ),
            "model.layers.0.attn.qkv_proj.lora_B": ort.OrtValue.ortvalue_from_numpy(
                np.zeros((2, 256), np.float32)
            ),
        }
    )
    fmt.export_adapter(str(misfit))
    cases = [
        ({"lora_name": "g", "lora_path": garbage.as_uri()}, 400, "not an onnxruntime adapter file"),
        (
            {"lora_name": "m", "lora_path": misfit.as_uri()},
            400,
            r"does not fit model assistant: model.layers.0.attn.qkv_proj: A is [64, 2]",
        ),
        ({"lora_name": "o", "lora_path": files["orchard"].as_uri(), "sha256": "0" * 64}, 400, "sha256 is"),
        ({"lora_name": "o", "lora_path": (tmp_path / "adapters" / "missing").as_uri()}, 400, "adapter o:"),
        (
            {"lora_name": "o", "lora_path": outside.as_uri()},
            400,
            f"{outside} is outside the adapter directories",
        ),
        (
            {"lora_name": "o", "lora_path": str(tmp_path / "adapters" / "link.onnx_adapter")},
            400,
            "link.onnx_adapter is outside the adapter directories",
        ),
        (
            {"lora_name": "o", "lora_path": "file:///etc/hostname"},
            400,
            "/etc/hostname is outside the adapter",
        ),
        ({"lora_name": "Bad Name", "lora_path": files["orchard"].as_uri()}, 400, "adapter name 'Bad Name'"),
        ({"lora_name": "base", "lora_path": files["orchard"].as_uri()}, 400, "and not 'base'"),
        ({"lora_path": files["orchard"].as_uri()}, 400, "lora_name must be a non-empty string"),
        (
            {"lora_name": "harbour", "lora_path": files["orchard"].as_uri()},
            409,
            "loaded already; set replace",
        ),
        (
            {"lora_name": "o", "lora_path": files["orchard"].as_uri(), "replace": "yes"},
            400,
            "replace must be true or false",
        ),
        (
            {"lora_name": "o", "lora_path": files["orchard"].as_uri(), "model": "other"},
            404,
            "'other' is not served here",
        ),
    ]
    for body, status, message in cases:
        r = admin(server, "load_lora_adapter", body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"]["message"], (message, r.text)
    bad_json = httpx.post(f"{server.url}/v1/load_lora_adapter", content=b"{", headers=ADMIN)
    assert bad_json.status_code == 400
    assert admin(server, "unload_lora_adapter", {"lora_name": "nowhere"}).status_code == 404
    assert admin(server, "default_lora_adapter", {"lora_name": "nowhere"}).status_code == 404
    assert admin(server, "default_lora_adapter", {"lora_name": "harbour"}).status_code == 200
    unload_default = admin(server, "unload_lora_adapter", {"lora_name": "harbour"})
    assert unload_default.status_code == 409 and "is the default" in unload_default.json()["error"]["message"]
    # Nothing was lost: harbour still answers, nothing else got loaded, the server is ready.
    assert adapter_state(server) == (1, 1)
    # Refused by the loader: garbage, misfit, digest, missing file, three outside the adapter directories,
    # loaded already (the rest by the route).
    assert metric(server, "kiri:lora_adapter_loads_total", result="refused") == 8
    assert metric(server, "kiri:lora_adapter_loads_total", result="loaded") == 1
    assert metric(server, "kiri:lora_adapters") == 1
    assert complete(server, "assistant:harbour").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def _stream(server: ThreadedServer, model: str, n: int, out: list[Any], index: int) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    tokens: list[str] = []
    finish = None
    status = 0
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    finish = "error"
                    break
                choice = chunk["choices"][0]
                tokens.append(choice["text"])
                finish = choice["finish_reason"] or finish
    except httpx.HTTPError as e:
        finish = f"transport: {e}"
    out[index] = (status, finish, "".join(tokens))


def test_a_swap_and_an_unload_under_load_drop_no_request(
    start: Callable[..., ThreadedServer], files: dict[str, Path]
) -> None:
    # 100 ms per decode step: 24-token answers last 2.4 s, so the swap lands while every one decodes, even on a
    # machine busy enough to make the admin calls take a second.
    server = start(delay_ms=100.0)
    before = complete(server, "assistant:harbour").json()["choices"][0]["text"]
    assert (
        admin(
            server, "load_lora_adapter", {"lora_name": "orchard", "lora_path": files["orchard"].as_uri()}
        ).status_code
        == 200
    )
    orchard = complete(server, "assistant:orchard").json()["choices"][0]["text"]
    assert orchard != before
    results: list[Any] = [None] * 8
    threads = [
        threading.Thread(
            target=_stream,
            args=(server, "assistant:harbour" if i % 2 else "assistant:orchard", 24, results, i),
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(0.3)
    swap = admin(
        server,
        "load_lora_adapter",
        {"lora_name": "harbour", "lora_path": files["orchard"].as_uri(), "replace": True},
    )
    assert swap.status_code == 200, swap.text
    unload = admin(server, "unload_lora_adapter", {"lora_name": "orchard"})
    assert unload.status_code == 200
    # The swap did not wait for the requests: both old adapters are still held by them (swap time and its
    # effect on throughput are bench/learning/bench_adapters.py's).
    assert adapter_state(server) == (1, 3)
    for t in threads:
        t.join(60)
    for i, (status, finish, text) in enumerate(results):
        assert status == 200 and finish in ("length", "stop"), (i, results[i])
        assert text == (before if i % 2 else orchard), i  # each finished on the adapter it started with
    # After: harbour answers with the new file, orchard is gone, and the retired keys were unloaded.
    assert complete(server, "assistant:harbour").json()["choices"][0]["text"] == orchard
    assert complete(server, "assistant:orchard").status_code == 404
    deadline = time.monotonic() + 5
    while adapter_state(server) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter_state(server) == (1, 1)


def test_echo_scores_a_prompt_with_the_adapter_it_names(
    start: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    from lm_sites import documents

    server = start()
    text = " ".join(documents("harbour", 3, 9))

    def nll(model: str) -> float:
        body = {
            "model": model,
            "prompt": text,
            "echo": True,
            "logprobs": 0,
            "max_tokens": 1,
            "temperature": 0,
        }
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        prompt = [lp for lp in lps[1:-1] if lp is not None]
        return -sum(prompt) / len(prompt)

    assert nll("assistant:harbour") < 0.7 * nll("assistant:base")


def test_a_retired_adapter_is_unloaded_when_its_last_request_ends_with_no_other_traffic(
    start: Callable[..., ThreadedServer], files: dict[str, Path]
) -> None:
    server = start(delay_ms=100.0)
    results: list[Any] = [None]
    thread = threading.Thread(target=_stream, args=(server, "assistant:harbour", 24, results, 0))
    thread.start()
    time.sleep(0.3)
    body = {"lora_name": "harbour", "lora_path": files["orchard"].as_uri(), "replace": True}
    assert admin(server, "load_lora_adapter", body).status_code == 200
    assert adapter_state(server) == (1, 2)  # the old one is held by the request
    thread.join(60)
    assert results[0][0] == 200 and results[0][1] in ("length", "stop")
    deadline = time.monotonic() + 5
    while adapter_state(server) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter_state(server) == (1, 1)
