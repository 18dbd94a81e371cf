"""Slices of the test metrics, checked by hand on a toy ranking."""

import math

import numpy as np

from training.scoring import text_knn_scorer
from training.sequences import EvalSet
from training.slices import item_buckets, slice_lines, slice_metrics


def test_item_buckets_by_training_interactions():
    # item:   0(pad) 1   2   3   4  5  6  7
    counts = [0, 100, 60, 40, 10, 5, 1, 0]  # 216 interactions; 20% = 43.2
    buckets = item_buckets(np.array(counts))
    # Item 1 alone (100) crosses 20%: head. 2, 3, 4 are above the tail: torso. 5, 6 <= 5
    # interactions: tail. 7 never seen in training: cold (and padding too).
    assert buckets.tolist() == [3, 0, 1, 1, 1, 2, 2, 3]


def test_head_never_takes_tail_items():
    # A tiny catalog where 20% of interactions needs items with <= 5 each.
    buckets = item_buckets(np.array([0, 3, 3, 3, 3]))
    assert buckets.tolist() == [3, 2, 2, 2, 2]


def test_slices_from_ranks_by_hand():
    counts = np.array([0, 100, 60, 40, 10, 5, 1, 0])
    targets = np.array([1, 1, 3, 6, 7, 7])
    lengths = np.array([3, 30, 10, 5, 6, 21])
    ranks = {"model": np.array([0, 9, 1, 0, 50, 2]),
             "popularity": np.array([0, 0, 3, 40, 60, 60])}
    out = slice_metrics(ranks, targets, lengths, counts)
    # head: targets 1, 1 with model ranks 0 and 9 -> HR@10 1.0, NDCG (1 + 1/log2(11)) / 2
    assert out["head"]["users"] == 2
    assert out["head"]["model"]["hr@10"] == 1.0
    assert math.isclose(out["head"]["model"]["ndcg@10"], (1 + 1 / math.log2(11)) / 2)
    assert out["torso"]["users"] == 1
    assert math.isclose(out["torso"]["model"]["ndcg@10"], 1 / math.log2(3))
    assert math.isclose(out["torso"]["popularity"]["ndcg@10"], 1 / math.log2(5))
    assert out["tail"]["users"] == 1 and out["tail"]["model"]["ndcg@10"] == 1.0
    # cold: ranks 50 and 2 -> one hit of two
    assert out["cold"]["users"] == 2
    assert out["cold"]["model"]["hr@10"] == 0.5
    assert out["cold"]["popularity"]["hr@10"] == 0.0
    # history <= 5: lengths 3 and 5 (rows 0, 3); 6-20: rows 2 and 4; > 20: rows 1 and 5
    assert [out[n]["users"] for n in ("history<=5", "history 6-20", "history>20")] == [2, 2, 2]
    assert out["history<=5"]["model"]["hr@10"] == 1.0
    assert out["history 6-20"]["model"]["hr@10"] == 0.5
    assert math.isclose(out["history>20"]["model"]["ndcg@10"],
                        (1 / math.log2(11) + 1 / math.log2(4)) / 2)
    # Every user is in exactly one item bucket and one history bucket.
    assert sum(out[n]["users"] for n in ("head", "torso", "tail", "cold")) == len(targets)
    lines = slice_lines(out)
    assert any(line.startswith("cold") for line in lines)


def test_text_knn_scores_cosine_with_the_last_item():
    text = np.array([[0, 0], [1, 0], [0, 2], [3, 3]], np.float32)  # row 0 padding
    data = EvalSet(users=np.array([0]), history=np.array([[0, 2, 1]]),
                   event_types=np.zeros((1, 3), np.int32), target=np.array([3]),
                   seen=[np.array([2, 1])])
    scores = text_knn_scorer(text, data)(np.array([0]))
    np.testing.assert_allclose(scores[0], [0, 1, 0, 1 / math.sqrt(2)], atol=1e-6)
