"""Training windows cut from per-user sequences."""

import numpy as np
import pytest

from training.sequences import Sequences, training_arrays


def sequences(lengths: list[int]) -> Sequences:
    """Users with consecutive item ids: the first user has items 1..lengths[0], and so on."""
    total = sum(lengths)
    items = np.arange(1, total + 1, dtype=np.int32)
    zeros_i, zeros_f = np.zeros(total, np.int32), np.zeros(total, np.float32)
    none = np.zeros(len(lengths), np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Sequences(np.arange(len(lengths)), offsets, items, zeros_i + 1, zeros_f, zeros_f,
                     none, none, none, none, ["view"], total, np.zeros(0, np.int32))


def test_last_window_is_the_newest_items_with_next_item_targets():
    arrays = training_arrays(sequences([9, 3, 1]), max_len=3)
    np.testing.assert_array_equal(arrays["history"], [[6, 7, 8], [0, 10, 11]])
    np.testing.assert_array_equal(arrays["targets"], [[7, 8, 9], [0, 11, 12]])


def test_all_windows_make_every_train_event_after_the_first_a_target_once():
    lengths = [9, 3, 1, 50, 7]
    arrays = training_arrays(sequences(lengths), max_len=4, windows="all")
    targets = arrays["targets"][arrays["targets"] > 0]
    firsts = np.concatenate([[0], np.cumsum(lengths)])[:-1] + 1
    expected = np.setdiff1d(np.arange(1, sum(lengths) + 1), firsts)
    np.testing.assert_array_equal(np.sort(targets), expected)  # each exactly once
    history, next_items = arrays["history"], arrays["targets"]
    real = history > 0
    # The target at each position is the item right after the input there (same user).
    np.testing.assert_array_equal(next_items[real], history[real] + 1)
    assert ((next_items > 0) == real).all()


def test_unknown_window_mode_is_an_error():
    with pytest.raises(ValueError, match="windows"):
        training_arrays(sequences([3]), max_len=3, windows="some")
