"""Edge-cloud collaborative generation between two real `kiri serve` servers: the cloud serves the tiny trained LLaMA
in fp32, the edge its int4 build (what `kiri compress` makes by default), wired by `--fallback-url`.

References are plain onnxruntime-genai loops written here, not the servers' own code: greedy text of the fp32 model
(what speculative must equal token for token), and a two-model cascade loop (what the cascade's counts must be)."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from runtime_helpers import ThreadedServer

from kiri_runtime.collaborations import CollabConfig
from kiri_runtime.serving import ServeConfig
from lm_fixture import greedy_chat

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = ["def dedent(text):\n", "class Template:\n", "import os\n", "    return", "def _glob"]
QUESTION = [{"role": "user", "content": "What does def dedent do?"}]


@pytest.fixture(scope="module")
def cloud_dir() -> Path:
    from lm_fixture import tiny_genai

    return tiny_genai()


@pytest.fixture(scope="module")
def edge_dir() -> Path:
    from lm_fixture import tiny_genai

    return tiny_genai(precision="int4")


def _start(model_dir: Path | str, cache: Path, wait: bool = True, **over: Any) -> ThreadedServer:
    config = ServeConfig(
        model_uri=str(model_dir),
        name="tiny",
        host="127.0.0.1",
        port=0,
        cache_dir=cache,
        threads=1,
        shutdown_grace_s=5.0,
        fetch_retry_max_s=1.0,
    )
    for key, value in over.items():
        setattr(config, key, value)
    server = ThreadedServer(config).start()
    if wait:
        server.wait_ready(60)
    return server


@pytest.fixture(scope="module")
def cloud(cloud_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    s = _start(cloud_dir, tmp_path_factory.mktemp("cloud"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def edge(
    edge_dir: Path, cloud: ThreadedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    s = _start(
        edge_dir,
        tmp_path_factory.mktemp("edge"),
        fallback_url=cloud.url,
        collaboration=CollabConfig(mode="speculative"),
    )
    yield s
    s.stop()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []

    def make(model_dir: Path | str, wait: bool = True, **over: Any) -> ThreadedServer:
        servers.append(_start(model_dir, tmp_path / f"c{len(servers)}", wait, **over))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


class Greedy:
    """A plain onnxruntime-genai model for the references."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(np.asarray(ids, dtype=np.int32)))

    def generate(self, ids: list[int], n: int) -> list[int]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        g = self.og.Generator(self.model, params)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        out: list[int] = []
        while not g.is_done():
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
            if out[-1] == 2:
                break
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        g = self.og.Generator(self.model, params)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(g.get_logits(), dtype=np.float64).reshape(-1)


def margin_uncertainty(logits: np.ndarray) -> float:
    """1 - (top-1 probability - runner-up probability): the cascade's default measure."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    second, first = np.sort(p)[-2:]
    return float(1.0 - (first - second))


def complete(server: ThreadedServer, prompt: str, n: int, **kiri: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
    if kiri:
        body["kiri"] = kiri
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def metric(server: ThreadedServer, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in sorted(labels.items())]
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(w in head for w in want):
                total += float(value)
    return total


def test_speculative_greedy_text_equals_the_cloud_models_greedy_text_token_for_token(
    edge: ThreadedServer, cloud_dir: Path
) -> None:
    reference = Greedy(cloud_dir)
    for prompt in PROMPTS:
        expected = reference.generate(reference.encode(prompt), 40)
        answer = complete(edge, prompt, 40)
        kiri = answer["usage"]["kiri"]
        assert answer["choices"][0]["text"] == reference.decode([t for t in expected if t != 2]), prompt
        assert answer["usage"]["completion_tokens"] == len(expected)
        assert kiri["collaboration"] == "speculative"
        assert kiri["edge_tokens"] + kiri["cloud_tokens"] == len(expected)
        assert (
            kiri["edge_tokens"] == kiri["accepted_tokens"] and kiri["cloud_tokens"] == kiri["cloud_requests"]
        )
        assert kiri["cloud_passes"] == kiri["cloud_requests"] < len(expected)  # one pass per verify
        assert kiri["handoffs"] == 0 and kiri["handoff_reason"] is None


def test_speculative_at_concurrency_four_and_cloud_only_give_the_same_text_as_cloud_greedy(
    edge: ThreadedServer, cloud_dir: Path
) -> None:
    reference = Greedy(cloud_dir)
    expected = {
        p: reference.decode([t for t in reference.generate(reference.encode(p), 32) if t != 2])
        for p in PROMPTS
    }
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        spec = list(pool.map(lambda p: complete(edge, p, 32), PROMPTS))
        only = list(pool.map(lambda p: complete(edge, p, 32, collaboration="cloud-only"), PROMPTS))
    for prompt, s, c in zip(PROMPTS, spec, only, strict=True):
        assert s["choices"][0]["text"] == expected[prompt]
        assert c["choices"][0]["text"] == expected[prompt]
        tokens = c["usage"]["completion_tokens"]
        assert c["usage"]["kiri"] | {"handoff_reason": None} == {
            "collaboration": "cloud-only",
            "edge_tokens": 0,
            "cloud_tokens": tokens,
            "cloud_passes": tokens,
            "cloud_requests": 1,
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "checked_tokens": 0,
            "corrected_tokens": 0,
            "handoffs": 0,
            "handoff_reason": None,
        }


def test_a_speculative_chat_answer_through_the_openai_client_is_the_cloud_greedy_answer(
    edge: ThreadedServer, cloud: ThreadedServer, cloud_dir: Path
) -> None:
    # A question the cloud model answers to its end within 30 tokens (which one depends on the weights
    # trained on this machine), so the speculative answer must also stop where the cloud's does.
    chat = greedy_chat(cloud_dir)

    def ask(server: ThreadedServer, **extra: Any) -> Any:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return client.chat.completions.create(
            model="tiny", messages=chat.messages, temperature=0, max_tokens=30, **extra
        )

    direct = ask(cloud)
    assert direct.choices[0].message.content == chat.text
    answer = ask(edge, extra_body={"kiri": {"collaboration": "speculative"}})
    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.choices[0].finish_reason == direct.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.model_extra is not None
    assert answer.usage.model_extra["kiri"]["collaboration"] == "speculative"


def test_the_verify_call_scores_every_prompt_token_in_one_request_like_a_teacher_forced_pass(
    cloud: ThreadedServer, cloud_dir: Path
) -> None:
    reference = Greedy(cloud_dir)
    ids = reference.encode("def dedent(text):\n    ")
    body = {
        "model": "tiny",
        "prompt": ids,
        "max_tokens": 1,
        "echo": True,
        "logprobs": 2,
        "temperature": 0,
        "return_tokens_as_token_ids": True,
    }
    answer = httpx.post(f"{cloud.url}/v1/completions", json=body).json()
    lps = answer["choices"][0]["logprobs"]
    assert lps["tokens"] == [f"token_id:{t}" for t in [*ids, reference.generate(ids, 1)[0]]]
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    for j in range(1, len(ids) + 1):
        logits = reference.logits(ids[:j])
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        top = lps["top_logprobs"][j]
        best = max(top, key=top.get)
        assert best == f"token_id:{int(np.argmax(logits))}"
        assert top[best] == pytest.approx(float(logp.max()), abs=1e-4)
        if j < len(ids):
            assert lps["token_logprobs"][j] == pytest.approx(float(logp[ids[j]]), abs=1e-4)
    assert answer["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 1,
        "total_tokens": len(ids) + 1,
    }
    assert answer["choices"][0]["text"].startswith("def dedent(text):\n    ")


def raw_cascade(
    edge: Greedy, cloud: Greedy, ids: list[int], n: int, threshold: float
) -> tuple[list[str], float]:
    """The cascade by hand (window 1, one cloud token per hand-off): per token, the edge's uncertainty over the
    threshold -> the cloud's argmax, else the edge's. Returns the tiers and how close an uncertainty came to it."""
    context, tiers, closest = list(ids), [], float("inf")
    while len(tiers) < n:
        logits = edge.logits(context)
        h = margin_uncertainty(logits)
        closest = min(closest, abs(h - threshold))
        if h > threshold:
            token, tier = int(np.argmax(cloud.logits(context))), "cloud"
        else:
            token, tier = int(np.argmax(logits)), "edge"
        tiers.append(tier)
        context.append(token)
        if token == 2:
            break
    return tiers, closest


def test_the_cascade_hands_a_token_to_the_cloud_exactly_where_the_edge_is_uncertain(
    edge: ThreadedServer, edge_dir: Path, cloud_dir: Path
) -> None:
    edge_ref, cloud_ref = Greedy(edge_dir), Greedy(cloud_dir)
    prompt, threshold = "def dedent(text):\n", 0.75
    tiers, closest = raw_cascade(edge_ref, cloud_ref, edge_ref.encode(prompt), 24, threshold)
    assert closest > 1e-3  # no uncertainty sits on the threshold: the server must see the same side
    assert 0 < tiers.count("cloud") < len(tiers)  # the prompt and threshold exercise both tiers
    answer = complete(
        edge,
        prompt,
        24,
        collaboration="cascade",
        cascade_threshold=threshold,
        cascade_cloud_tokens=1,
        cascade_check="off",
    )
    kiri = answer["usage"]["kiri"]
    assert (kiri["edge_tokens"], kiri["cloud_tokens"]) == (tiers.count("edge"), tiers.count("cloud"))
    assert kiri["handoffs"] == kiri["cloud_requests"] == kiri["cloud_passes"] == tiers.count("cloud")
    assert kiri["handoff_reason"] == "uncertainty"


def test_a_cascade_whose_threshold_is_never_passed_stays_on_the_edge_and_one_at_zero_goes_to_the_cloud(
    edge: ThreadedServer, edge_dir: Path, cloud_dir: Path
) -> None:
    calm = complete(
        edge, "import os\n", 20, collaboration="cascade", cascade_threshold=100.0, cascade_check="off"
    )
    edge_only = complete(edge, "import os\n", 20, collaboration="edge-only")
    assert calm["choices"][0]["text"] == edge_only["choices"][0]["text"]
    assert (calm["usage"]["kiri"]["edge_tokens"], calm["usage"]["kiri"]["handoffs"]) == (20, 0)
    before = metric(edge, "kiri:collab_handoffs_total", reason="uncertainty")
    nervous = complete(edge, "import os\n", 20, collaboration="cascade", cascade_threshold=0.0)
    assert (
        nervous["choices"][0]["text"]
        == complete(edge, "import os\n", 20, collaboration="cloud-only")["choices"][0]["text"]
    )
    kiri = nervous["usage"]["kiri"]
    assert (kiri["edge_tokens"], kiri["cloud_tokens"], kiri["handoffs"], kiri["cloud_requests"]) == (
        0,
        20,
        1,
        1,
    )
    assert metric(edge, "kiri:collab_handoffs_total", reason="uncertainty") == before + 1


def raw_checked_cascade(
    edge: Greedy, cloud: Greedy, ids: list[int], n: int, threshold: float, final: bool = True
) -> tuple[list[int], dict[str, int], float]:
    """The checked cascade by hand (window 1, one cloud token per hand-off): the edge's greedy tokens are held
    until its uncertainty passes the threshold (or the answer ends: checked too when `final`); then each held
    token stands while it is the cloud's argmax after the tokens before it; the first that is not is replaced by
    the cloud's and the edge resumes after it; all standing: the cloud's next token. Returns the tokens, the
    counts the answer must report, and how close an uncertainty came to the threshold."""
    out: list[int] = []
    counts = {"edge": 0, "cloud": 0, "checked": 0, "corrected": 0, "requests": 0, "handoffs": 0}
    closest = float("inf")
    held: list[int] = []
    while len(out) < n and 2 not in out:
        logits = edge.logits(ids + out + held)
        h = margin_uncertainty(logits)
        closest = min(closest, abs(h - threshold))
        uncertain = h > threshold
        if not uncertain:
            held.append(int(np.argmax(logits)))
            if held[-1] != 2 and len(out) + len(held) < n:
                continue
        counts["handoffs"] += uncertain
        if held and (uncertain or final):
            counts["requests"] += 1
            counts["checked"] += len(held)
            for i, token in enumerate(held):
                best = int(np.argmax(cloud.logits(ids + out + held[:i])))
                if best != token:
                    out += [*held[:i], best]
                    counts["edge"] += i
                    counts["cloud"] += 1
                    counts["corrected"] += 1
                    break
            else:
                out += held
                counts["edge"] += len(held)
                if uncertain:
                    out.append(int(np.argmax(cloud.logits(ids + out))))
                    counts["cloud"] += 1
        elif held:
            out += held
            counts["edge"] += len(held)
        else:
            counts["requests"] += 1
            out.append(int(np.argmax(cloud.logits(ids + out))))
            counts["cloud"] += 1
        held = []
    return out[:n], counts, closest


def _flipped_case(edge_ref: Greedy, cloud_ref: Greedy, n: int) -> tuple[str, float]:
    """A prompt and threshold where the unchecked cascade's answer leaves the cloud's greedy one (an int4 flip
    its uncertainty did not flag) while handing off at least once, no uncertainty near the threshold."""
    for threshold in (0.9, 0.94, 0.96, 0.98):
        for prompt in PROMPTS:
            ids = edge_ref.encode(prompt)
            tiers, closest = raw_cascade(edge_ref, cloud_ref, ids, n, threshold)
            _, _, closest_checked = raw_checked_cascade(edge_ref, cloud_ref, ids, n, threshold)
            if "cloud" not in tiers or min(closest, closest_checked) < 1e-3:
                continue
            context = list(ids)
            for tier in tiers:  # the unchecked cascade's tokens, rebuilt from its tiers
                model = cloud_ref if tier == "cloud" else edge_ref
                context.append(int(np.argmax(model.logits(context))))
            if context[len(ids) :] != cloud_ref.generate(ids, n)[: len(tiers)]:
                return prompt, threshold
    raise AssertionError("no prompt and threshold with an unflagged int4 flip: the fixture changed")


def test_the_checked_cascade_corrects_an_int4_flip_its_uncertainty_missed_and_answers_the_cloud_greedy_text(
    edge: ThreadedServer, edge_dir: Path, cloud_dir: Path
) -> None:
    edge_ref, cloud_ref = Greedy(edge_dir), Greedy(cloud_dir)
    n = 24
    prompt, threshold = _flipped_case(edge_ref, cloud_ref, n)
    ids = edge_ref.encode(prompt)
    cloud_text = cloud_ref.decode(cloud_ref.generate(ids, n))
    options = {"collaboration": "cascade", "cascade_threshold": threshold, "cascade_cloud_tokens": 1}
    unchecked = complete(edge, prompt, n, **options, cascade_check="off")
    assert unchecked["choices"][0]["text"] != cloud_text  # the flip is there without the check

    before = [
        metric(edge, name)
        for name in ("kiri:collab_cascade_checked_tokens_total", "kiri:collab_cascade_corrected_tokens_total")
    ]
    checked = complete(edge, prompt, n, **options, cascade_check="full")
    assert checked["choices"][0]["text"] == cloud_text
    tokens, counts, _ = raw_checked_cascade(edge_ref, cloud_ref, ids, n, threshold)
    assert cloud_ref.decode(tokens) == cloud_text
    kiri = checked["usage"]["kiri"]
    assert counts["corrected"] >= 1
    assert (
        kiri["edge_tokens"],
        kiri["cloud_tokens"],
        kiri["checked_tokens"],
        kiri["corrected_tokens"],
        kiri["cloud_requests"],
        kiri["handoffs"],
    ) == (
        counts["edge"],
        counts["cloud"],
        counts["checked"],
        counts["corrected"],
        counts["requests"],
        counts["handoffs"],
    )
    # a replaced token is the cloud's: the tiers add up to the answer, and the edge's share is what it kept
    assert kiri["edge_tokens"] + kiri["cloud_tokens"] == checked["usage"]["completion_tokens"]
    after = [
        metric(edge, name)
        for name in ("kiri:collab_cascade_checked_tokens_total", "kiri:collab_cascade_corrected_tokens_total")
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [counts["checked"], counts["corrected"]]


def test_a_cascade_checked_at_hand_offs_only_leaves_the_answers_tail_to_the_edge(
    edge: ThreadedServer, edge_dir: Path, cloud_dir: Path
) -> None:
    edge_ref, cloud_ref = Greedy(edge_dir), Greedy(cloud_dir)
    n = 24
    prompt, threshold = _flipped_case(edge_ref, cloud_ref, n)
    ids = edge_ref.encode(prompt)
    tokens, counts, _ = raw_checked_cascade(edge_ref, cloud_ref, ids, n, threshold, final=False)
    answer = complete(
        edge,
        prompt,
        n,
        collaboration="cascade",
        cascade_threshold=threshold,
        cascade_cloud_tokens=1,
        cascade_check="handoffs",
    )
    assert answer["choices"][0]["text"] == cloud_ref.decode(tokens)
    kiri = answer["usage"]["kiri"]
    assert (kiri["edge_tokens"], kiri["cloud_tokens"], kiri["checked_tokens"], kiri["cloud_requests"]) == (
        counts["edge"],
        counts["cloud"],
        counts["checked"],
        counts["requests"],
    )


def test_a_checked_cascade_that_never_hands_off_is_checked_at_the_end_and_streams_the_cloud_text(
    edge: ThreadedServer, edge_dir: Path, cloud_dir: Path
) -> None:
    edge_ref, cloud_ref = Greedy(edge_dir), Greedy(cloud_dir)
    n = 20
    # a prompt the edge alone answers otherwise than the cloud
    prompt = next(
        p
        for p in PROMPTS
        if edge_ref.generate(edge_ref.encode(p), n) != cloud_ref.generate(edge_ref.encode(p), n)
    )
    ids = cloud_ref.encode(prompt)
    cloud_text = cloud_ref.decode(cloud_ref.generate(ids, n))
    tokens, counts, _ = raw_checked_cascade(edge_ref, cloud_ref, ids, n, 100.0)
    assert counts["corrected"] >= 1
    client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            temperature=0,
            max_tokens=n,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"kiri": {"collaboration": "cascade", "cascade_threshold": 100.0}},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cloud_text == cloud_ref.decode(tokens)
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    kiri = usage.model_extra["kiri"]  # the default check (full): every round checked, no hand-off
    assert (kiri["handoffs"], kiri["cloud_requests"], kiri["edge_tokens"], kiri["cloud_tokens"]) == (
        0,
        counts["requests"],
        counts["edge"],
        counts["cloud"],
    )
    assert kiri["cloud_tokens"] == kiri["corrected_tokens"] == counts["corrected"]


def test_a_checked_cascade_with_a_stop_string_ends_where_the_cloud_only_answer_ends(
    edge: ThreadedServer,
) -> None:
    for prompt in PROMPTS:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": ["\n"]}
        ref = httpx.post(
            f"{edge.url}/v1/completions", json={**body, "kiri": {"collaboration": "cloud-only"}}, timeout=120
        ).json()
        got = httpx.post(
            f"{edge.url}/v1/completions",
            json={**body, "kiri": {"collaboration": "cascade", "cascade_threshold": 0.96}},
            timeout=120,
        ).json()
        assert got["choices"][0]["text"] == ref["choices"][0]["text"]
        assert got["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
        kiri = got["usage"]["kiri"]
        assert kiri["edge_tokens"] + kiri["cloud_tokens"] == got["usage"]["completion_tokens"]


def test_a_sampled_checked_cascade_checks_every_edge_token_it_keeps(edge: ThreadedServer) -> None:
    body = {
        "model": "tiny",
        "prompt": "def dedent(text):\n",
        "max_tokens": 32,
        "temperature": 0.8,
        "top_k": 10,
        "seed": 7,
        "kiri": {"collaboration": "cascade", "cascade_threshold": 100.0},
    }
    answer = httpx.post(f"{edge.url}/v1/completions", json=body, timeout=120).json()
    kiri = answer["usage"]["kiri"]
    assert kiri["edge_tokens"] + kiri["cloud_tokens"] == answer["usage"]["completion_tokens"]
    # no hand-off: the cloud's tokens are its replacements, each ending one check
    assert kiri["handoffs"] == 0
    assert kiri["cloud_tokens"] == kiri["corrected_tokens"]
    # every check but one that ends the answer replaced a token (with no hand-off a check that keeps its whole
    # span is the final one)
    assert kiri["cloud_requests"] - kiri["corrected_tokens"] in (0, 1)
    assert kiri["edge_tokens"] <= kiri["checked_tokens"]


def test_speculative_metrics_count_drafts_accepted_tokens_tiers_and_cloud_passes(
    edge: ThreadedServer,
) -> None:
    names = (
        "kiri:spec_decode_num_drafts_total",
        "kiri:spec_decode_num_draft_tokens_total",
        "kiri:spec_decode_num_accepted_tokens_total",
        "kiri:collab_cloud_passes_total",
    )
    before = [metric(edge, n) for n in names]
    tiers_before = [metric(edge, "kiri:collab_tokens_total", tier=t) for t in ("edge", "cloud")]
    kiri = complete(edge, "class Template:\n", 32)["usage"]["kiri"]
    after = [metric(edge, n) for n in names]
    wanted = [kiri["cloud_requests"], kiri["draft_tokens"], kiri["accepted_tokens"], kiri["cloud_passes"]]
    assert [a - b for a, b in zip(after, before, strict=True)] == wanted
    tiers = [
        metric(edge, "kiri:collab_tokens_total", tier=t) - b
        for t, b in zip(("edge", "cloud"), tiers_before, strict=True)
    ]
    assert tiers == [kiri["edge_tokens"], kiri["cloud_tokens"]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_with_the_cloud_down_the_edge_answers_alone_and_says_why(
    start: Callable[..., ThreadedServer], edge_dir: Path
) -> None:
    lonely = start(
        edge_dir,
        fallback_url=f"http://127.0.0.1:{_closed_port()}",
        collaboration=CollabConfig(mode="speculative"),
    )
    for mode in ("speculative", "cascade", "cloud-only"):
        answer = complete(lonely, "def dedent(text):\n", 24, collaboration=mode, cascade_threshold=0.0)
        kiri = answer["usage"]["kiri"]
        assert (
            answer["choices"][0]["text"]
            == complete(lonely, "def dedent(text):\n", 24, collaboration="edge-only")["choices"][0]["text"]
        )
        assert (kiri["edge_tokens"], kiri["cloud_tokens"], kiri["handoff_reason"]) == (
            24,
            0,
            "cloud_unavailable",
        )
    assert metric(lonely, "kiri:collab_handoffs_total", reason="cloud_unavailable") == 3


def test_an_edge_whose_model_is_not_loaded_has_the_cloud_answer_with_the_reason(
    start: Callable[..., ThreadedServer], cloud: ThreadedServer, tmp_path: Path
) -> None:
    missing = start(
        (tmp_path / "nowhere.onnx").as_uri(),
        wait=False,
        fallback_url=cloud.url,
        collaboration=CollabConfig(mode="speculative"),
    )
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 30}
    answer = httpx.post(f"{missing.url}/v1/chat/completions", json=body, timeout=60).json()
    direct = httpx.post(f"{cloud.url}/v1/chat/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["message"] == direct["choices"][0]["message"]
    tokens = direct["usage"]["completion_tokens"]
    assert answer["usage"]["kiri"] == {
        "collaboration": "cloud-only",
        "edge_tokens": 0,
        "cloud_tokens": tokens,
        "cloud_passes": tokens,
        "cloud_requests": 1,
        "draft_tokens": 0,
        "accepted_tokens": 0,
        "checked_tokens": 0,
        "corrected_tokens": 0,
        "handoffs": 1,
        "handoff_reason": "not_ready",
    }
    streamed = httpx.post(
        f"{missing.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ).text.splitlines()
    assert streamed[-2:] == ["data: [DONE]", ""] or streamed[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("kiri", "param"),
    [
        ({"collaboration": "turbo"}, "kiri.collaboration"),
        ({"collaboration": 3}, "kiri.collaboration"),
        ("speculative", "kiri"),
        ({"colaboration": "cascade"}, "kiri.colaboration"),
        ({"collaboration": "cascade", "cascade_threshold": -1}, "kiri.cascade_threshold"),
        ({"collaboration": "cascade", "cascade_window": 0}, "kiri.cascade_window"),
        ({"collaboration": "speculative", "speculative_k": 99}, "kiri.speculative_k"),
    ],
)
def test_a_bad_collaboration_value_is_a_400_naming_the_field(
    edge: ThreadedServer, kiri: Any, param: str
) -> None:
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 4, "kiri": kiri}
    reply = httpx.post(f"{edge.url}/v1/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_a_collaboration_that_needs_a_cloud_is_a_400_on_an_edge_without_one_and_so_are_its_logprobs(
    start: Callable[..., ThreadedServer], edge_dir: Path, edge: ThreadedServer
) -> None:
    alone = start(edge_dir)
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 4, "kiri": {"collaboration": "cascade"}}
    reply = httpx.post(f"{alone.url}/v1/completions", json=body)
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, "kiri.collaboration")
    assert "needs a cloud tier" in reply.json()["error"]["message"]
    reply = httpx.post(f"{edge.url}/v1/completions", json={**body, "logprobs": 1})
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, "logprobs")
    plain = httpx.post(
        f"{alone.url}/v1/completions", json={k: v for k, v in body.items() if k != "kiri"}
    ).json()
    assert plain["usage"]["kiri"]["collaboration"] == "edge-only"
    assert plain["usage"]["kiri"]["edge_tokens"] == plain["usage"]["completion_tokens"] == 4


def test_a_streamed_speculative_chat_joins_to_the_cloud_greedy_answer_and_ends_with_the_kiri_usage(
    edge: ThreadedServer, cloud: ThreadedServer
) -> None:
    client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(
        base_url=f"{cloud.url}/v1", api_key="unused", max_retries=0
    ).chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=30)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    kiri = usage.model_extra["kiri"]
    assert kiri["collaboration"] == "speculative"
    assert kiri["edge_tokens"] + kiri["cloud_tokens"] == usage.completion_tokens


def test_an_edge_at_its_limit_has_the_cloud_answer_the_next_request_with_the_reason(
    start: Callable[..., ThreadedServer], edge_dir: Path, cloud_dir: Path
) -> None:
    slow_cloud = start(cloud_dir, delay_ms=300.0)  # every cloud forward pass takes 300 ms
    busy = start(
        edge_dir, fallback_url=slow_cloud.url, queue_limit=1, collaboration=CollabConfig(mode="speculative")
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # one draft token per round: the first request holds the edge's one slot for 12 cloud passes (>= 3.6 s)
        first = pool.submit(complete, busy, "def dedent(text):\n", 24, speculative_k=1)
        deadline = time.monotonic() + 30
        while metric(busy, "kiri:collab_requests_total", collaboration="speculative") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = complete(busy, "import os\n", 4)
        assert first.result()["usage"]["kiri"]["collaboration"] == "speculative"
    assert second["usage"]["kiri"]["handoff_reason"] == "overloaded", second
    assert second["usage"]["kiri"]["cloud_tokens"] == second["usage"]["completion_tokens"] == 4
    assert metric(busy, "kiri:collab_handoffs_total", reason="overloaded") == 1
