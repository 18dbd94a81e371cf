"""Metric code against hand-computed values on toy rankings."""

import math

import numpy as np
import pytest

from training.evaluate import (evaluate, interval_text, metrics_from_ranks, ndcg_interval,
                               ranks_from_scores)
from training.sequences import EvalSet


def test_rank_counts_ties_against_target_and_excludes_seen():
    # items 1..5 (column 0 = padding). Target 3 scores 0.5; item 1 beats it, item 4 ties it,
    # item 2 beats it but is in the history, so it is excluded.
    scores = np.array([[9.0, 0.9, 0.8, 0.5, 0.5, 0.1]], np.float32)
    ranks = ranks_from_scores(scores, np.array([3]), [np.array([2])])
    assert ranks.tolist() == [2]  # item 1 and the tie (item 4)


def test_constant_scorer_gets_no_credit():
    scores = np.zeros((3, 21), np.float32)  # 20 items, all tied
    ranks = ranks_from_scores(scores, np.array([1, 5, 20]), [np.array([], int)] * 3)
    assert ranks.tolist() == [19, 19, 19]
    assert metrics_from_ranks(ranks)["hr@10"] == 0.0


def test_nan_target_score_earns_nothing():
    scores = np.array([[0.0, np.nan, 1.0, 2.0]], np.float32)
    assert ranks_from_scores(scores, np.array([1]), [np.array([], int)])[0] >= 3


def test_target_repeated_in_history_stays_rankable():
    scores = np.array([[0.0, 0.2, 0.9, 0.1]], np.float32)
    assert ranks_from_scores(scores, np.array([2]), [np.array([2, 3])]).tolist() == [0]


def test_metrics_hand_computed():
    m = metrics_from_ranks(np.array([0, 1, 9, 10]))
    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)
    assert m["hr@5"] == pytest.approx(2 / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)


def test_evaluate_end_to_end_with_popularity_scores():
    # 3 users, 4 items; popularity prefers 4 > 3 > 2 > 1.
    data = EvalSet(users=np.arange(3), history=np.zeros((3, 2), np.int32),
                   event_types=np.zeros((3, 2), np.int32), target=np.array([4, 1, 3]),
                   seen=[np.array([1]), np.array([4]), np.array([4, 2])])
    counts = np.array([0, 1, 2, 3, 4], np.float32)
    out = evaluate(lambda rows: np.tile(counts, (len(rows), 1)), data, num_items=4,
                   sampled_negatives=2)
    # user 0: target 4 best -> rank 0; user 1: 3 and 2 above target 1 -> rank 2;
    # user 2: 4 and 2 excluded, target 3 best -> rank 0.
    assert out["hr@5"] == 1.0
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert 0 < out["coverage@10"] <= 1
    assert "sampled_hr@10" in out
    assert out["ndcg@10_low"] <= out["ndcg@10"] <= out["ndcg@10_high"]
    assert interval_text(out) == f"{out['ndcg@10_low']:.4f}-{out['ndcg@10_high']:.4f}"
    assert interval_text({"ndcg@10": 0.2}) is None  # a run that did not record it


def test_ndcg_interval_is_mean_plus_minus_two_standard_errors():
    ranks = np.array([0, 0, 1, 3, 9, 10, 50, 200])
    gains = np.array([1, 1, 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(11), 0, 0, 0])
    half = 1.96 * gains.std(ddof=1) / math.sqrt(len(gains))
    low, high = ndcg_interval(ranks)
    assert low == pytest.approx(gains.mean() - half)
    assert high == pytest.approx(gains.mean() + half)
    # four times the users of the same kind: half the width
    low4, high4 = ndcg_interval(np.tile(ranks, 4))
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.1)
    assert ndcg_interval(np.zeros(5, int)) == (1.0, 1.0)  # every target first: no spread
    assert ndcg_interval(np.array([3])) == (None, None)  # one user: no interval
