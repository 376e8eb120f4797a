"""The pure parts of collaborative generation: request options, acceptance rules, the adaptive k, uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiri_runtime.collaborations import (
    CollabConfig,
    SpeculationTuner,
    Verdict,
    accept_greedy,
    accept_sampled,
    parse_options,
    sampling_probs,
    settle_check,
    uncertainty,
)
from kiri_runtime.generation_api import ApiError
from kiri_runtime.generative_model import SamplingParams

WITH_CLOUD = CollabConfig(mode="cascade", cloud_url="http://cloud:8080", cascade_threshold=1.5)


def test_request_options_override_the_deployments_and_default_to_it() -> None:
    assert parse_options(None, WITH_CLOUD, logprobs=False).mode == "cascade"
    opts = parse_options(
        {"collaboration": "speculative", "speculative_k": 5, "cascade_window": 3}, WITH_CLOUD, logprobs=False
    )
    assert (opts.mode, opts.speculative_k, opts.cascade_window, opts.cascade_threshold) == (
        "speculative",
        5,
        3,
        1.5,
    )


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"collaboration": "fast"}, "kiri.collaboration"),
        ([], "kiri"),
        ({"cascade_threshold": float("nan")}, "kiri.cascade_threshold"),
        ({"cascade_threshold": True}, "kiri.cascade_threshold"),
        ({"cascade_cloud_tokens": -1}, "kiri.cascade_cloud_tokens"),
        ({"speculative_k": 1.5}, "kiri.speculative_k"),
        ({"mode": "cascade"}, "kiri.mode"),
        ({"cascade_check": "always"}, "kiri.cascade_check"),
        ({"cascade_check": True}, "kiri.cascade_check"),
    ],
)
def test_a_bad_option_is_refused_naming_it(raw: object, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_options(raw, WITH_CLOUD, logprobs=False)
    assert (err.value.status, err.value.param) == (400, param)


def test_modes_that_need_the_cloud_are_refused_without_one_and_edge_only_is_not() -> None:
    alone = CollabConfig()
    assert parse_options({"collaboration": "edge-only"}, alone, logprobs=True).mode == "edge-only"
    for mode in ("cloud-only", "speculative", "cascade"):
        with pytest.raises(ApiError, match="needs a cloud tier"):
            parse_options({"collaboration": mode}, alone, logprobs=False)


def test_greedy_acceptance_keeps_draft_tokens_while_they_are_the_clouds_argmax() -> None:
    verdict = Verdict(
        top=[{5: -0.1, 6: -2.0}, {7: -0.5, 8: -0.9}, {9: -0.2}], draft_logprobs=[], next_token=11
    )
    assert accept_greedy([5, 8, 9], verdict) == (1, 7)  # the second is refused: the cloud's token is 7
    assert accept_greedy([5, 7, 9], verdict) == (3, 11)  # all kept: the cloud's own next token follows
    assert accept_greedy([6, 7, 9], verdict) == (0, 5)


def test_rejection_sampling_gives_the_clouds_distribution_whatever_the_edge_drafts() -> None:
    """Leviathan et al.'s rule with one draft token: the output token's distribution is q, not p."""
    rng = np.random.default_rng(0)
    vocab = 6
    params = SamplingParams(max_tokens=1, temperature=1.0)
    q_logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03]))
    p = np.array([0.05, 0.05, 0.5, 0.3, 0.05, 0.05])
    top = {i: float(q_logits[i]) for i in range(vocab)}
    counts = np.zeros(vocab)
    trials = 40_000
    for _ in range(trials):
        draft = int(rng.choice(vocab, p=p))
        verdict = Verdict(top=[top], draft_logprobs=[top[draft]], next_token=-1)
        accepted, token = accept_sampled([draft], [p], verdict, params, rng)
        counts[draft if accepted else token] += 1
    q = np.exp(q_logits)
    assert np.abs(counts / trials - q).max() < 0.01  # 4 standard errors at n=40k


def test_sampling_probs_apply_temperature_top_k_and_top_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert sampling_probs(logits, SamplingParams(1, temperature=1.0)) == pytest.approx([0.5, 0.3, 0.15, 0.05])
    assert sampling_probs(logits, SamplingParams(1, top_k=2)) == pytest.approx([0.625, 0.375, 0, 0])
    assert sampling_probs(logits, SamplingParams(1, top_p=0.7)) == pytest.approx([0.625, 0.375, 0, 0])


def test_the_adaptive_k_grows_with_the_round_trip_and_shrinks_with_refusals() -> None:
    def k_for(acceptance: float, verify_s: float) -> int:
        tuner = SpeculationTuner(max_k=16)
        for _ in range(50):
            k = 8  # accepted < k: the round ended at a refusal
            accepted = k if acceptance == 1.0 else round(acceptance / (1 - acceptance))
            tuner.observe(k, min(accepted, k), draft_s=k * 0.001, verify_s=verify_s)
        return tuner.choose()

    assert k_for(0.8, 0.100) > k_for(0.8, 0.005)
    assert k_for(0.5, 0.020) < k_for(0.8, 0.020)
    # At the extremes the choice hits the bounds: a verify as cheap as one draft step, with half the drafts
    # refused drafts one token; a verify costing 200 draft steps at 80 % acceptance drafts max_k.
    assert k_for(0.5, 0.001) == 1
    assert k_for(0.8, 0.200) == 16


def test_uncertainty_is_the_top_two_margin_one_minus_the_top_probability_or_entropy_in_nats() -> None:
    flat = np.zeros(4)
    assert uncertainty(flat, "entropy") == pytest.approx(math.log(4))
    assert uncertainty(flat, "top1") == pytest.approx(0.75)
    assert uncertainty(flat, "margin") == pytest.approx(1.0)  # a tie at the top
    sure = np.array([30.0, 0.0, 0.0, 0.0])
    for metric in ("entropy", "top1", "margin"):
        assert uncertainty(sure, metric) < 1e-9
    two_way = np.log(np.array([0.5, 0.3, 0.1, 0.1]))
    assert uncertainty(two_way, "margin") == pytest.approx(0.8)


def test_the_cascade_check_is_full_by_default_and_a_request_may_turn_it_off() -> None:
    assert parse_options(None, WITH_CLOUD, logprobs=False).cascade_check == "full"
    assert parse_options({"cascade_check": "off"}, WITH_CLOUD, logprobs=False).cascade_check == "off"
    handoffs = CollabConfig(mode="cascade", cloud_url="http://cloud:8080", cascade_check="handoffs")
    assert parse_options({"cascade_window": 2}, handoffs, logprobs=False).cascade_check == "handoffs"


def _checked_verdict(
    span: list[int], cloud_argmax: list[int], continuation: list[int], finished: bool
) -> Verdict:
    top = [
        {best: -0.1, token: -2.0} if best != token else {best: -0.1}
        for token, best in zip(span, cloud_argmax, strict=True)
    ]
    return Verdict(top, [-0.1] * len(span), continuation[0], 0.0, continuation, finished)


def test_a_check_that_refuses_an_edge_token_keeps_the_prefix_replaces_it_and_drops_the_continuation() -> None:
    held = [5, 6, 7, 8]
    verdict = _checked_verdict(held, [5, 6, 9, 8], [40, 41, 42], finished=False)
    accepted, token = accept_greedy(held, verdict)
    checked = settle_check(held, accepted, token, verdict, 3)
    # edge: the two agreeing tokens; cloud: its replacement of the third (a cloud token, not an edge one); the
    # fourth edge token and the cloud's three tokens after the whole span followed the refused token: dropped
    assert (checked.edge, checked.cloud, checked.corrected, checked.finished) == ([5, 6], [9], True, False)
    assert checked.passes == 3  # the cloud ran them: the span with its first token in one pass, then two


def test_a_check_that_keeps_every_edge_token_takes_the_clouds_continuation_up_to_the_hand_offs_share() -> (
    None
):
    held = [5, 6]
    verdict = _checked_verdict(held, [5, 6], [40, 41], finished=True)
    accepted, token = accept_greedy(held, verdict)
    checked = settle_check(held, accepted, token, verdict, 2)
    assert (checked.edge, checked.cloud, checked.corrected, checked.finished, checked.passes) == (
        [5, 6],
        [40, 41],
        False,
        True,
        2,
    )
    one = settle_check(held, accepted, token, verdict, 1)  # asked for one: the cloud did not end the answer
    assert (one.cloud, one.finished) == ([40], False)


def test_a_final_check_that_keeps_every_edge_token_adds_no_cloud_token() -> None:
    held = [5, 6, 2]
    verdict = _checked_verdict(held, [5, 6, 2], [7], finished=False)
    accepted, token = accept_greedy(held, verdict)
    checked = settle_check(held, accepted, token, verdict, 0)
    assert (checked.edge, checked.cloud, checked.corrected, checked.finished, checked.passes) == (
        [5, 6, 2],
        [],
        False,
        False,
        1,
    )
    refused = _checked_verdict(held, [5, 3, 2], [7], finished=False)
    accepted, token = accept_greedy(held, refused)
    checked = settle_check(held, accepted, token, refused, 0)
    assert (checked.edge, checked.cloud, checked.corrected) == ([5], [3], True)
