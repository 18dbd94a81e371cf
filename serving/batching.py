"""Opportunistic micro-batching of SavedModel signature calls.

One worker thread runs the model. A call queued while the worker is busy waits for the current
batch to finish, then goes out together with every other call queued meanwhile on the same
signature, as one [batch, n] call padded with "" (which every signature reads as padding). An
idle server adds no wait: a lone request runs at once, as a batch of one. Under load the
per-request cost of the graph (hundreds of small ops whatever the batch) is shared.

With the ScaNN model a batch fetches as many candidates as its longest history needs, so an
answer can differ slightly with the traffic it shared a batch with (never in recall below the
export's measured figure); the brute-force model's answers do not depend on batching beyond
float rounding.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from export import contract as c

log = logging.getLogger(__name__)

MAX_BATCH = 64


@dataclass
class _Call:
    signature: Callable
    inputs: dict[str, list[str]]
    future: Future = field(default_factory=Future)
    # Run on the batch's answers before they are handed out (one call for the whole batch:
    # the live items are scored for every query of the batch in one product).
    post: Callable[[list[dict]], None] | None = None
    post_inline: bool = False  # run `post` on the model's thread (cheap), not beside it

    def batches_with(self, other: _Call) -> bool:
        return (other.signature is self.signature and other.inputs.keys() == self.inputs.keys()
                and other.post == self.post)


def run_batch(signature: Callable, rows: list[dict[str, list[str]]]) -> list[dict[str, np.ndarray]]:
    """Call a signature once for several requests; each gets back its own output rows.

    Histories and event types are left-padded and candidates right-padded with ""; outputs
    that follow the candidates are cut back to each request's own candidates.
    """
    tensors = {}
    for name in rows[0]:
        width = max(1, max(len(row[name]) for row in rows))
        if name == c.LIVE_VECTORS:  # [n, dim] float rows beside the history: left-padded
            dim = rows[0][name].shape[1]
            block = np.zeros((len(rows), width, dim), np.float32)
            for i, row in enumerate(rows):
                if len(row[name]):
                    block[i, width - len(row[name]):] = row[name]
            tensors[name] = tf.constant(block)
            continue
        if name == c.CANDIDATES:
            padded = [row[name] + [""] * (width - len(row[name])) for row in rows]
        else:
            padded = [[""] * (width - len(row[name])) + row[name] for row in rows]
        tensors[name] = tf.constant(padded, tf.string)
    out = {name: value.numpy() for name, value in signature(**tensors).items()}
    answers = []
    for i, row in enumerate(rows):
        cut = len(row[c.CANDIDATES]) if c.CANDIDATES in row else None
        answers.append({name: value[i][:cut] if cut is not None else value[i]
                        for name, value in out.items()})
    return answers


class Batcher:
    """The worker thread and its queue; `submit` returns a Future of one request's outputs."""

    def __init__(self, max_batch: int = MAX_BATCH):
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # Post hooks (live items scored for a batch) run here, beside the model's thread.
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-post")
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)
        self._thread.start()

    def submit(self, signature: Callable, inputs: dict[str, list[str]],
               post: Callable[[list[dict]], None] | None = None,
               post_inline: bool = False) -> Future:
        call = _Call(signature, inputs, post=post, post_inline=post_inline)
        self._queue.put(call)
        return call.future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._post.shutdown(wait=True)

    def _run(self) -> None:
        waiting: list[_Call] = []  # taken from the queue for a later batch (other signature)
        while True:
            first = waiting.pop(0) if waiting else self._queue.get()
            if first is None:
                return
            batch, later = [first], []
            for call in waiting:
                (batch if first.batches_with(call) and len(batch) < self.max_batch
                 else later).append(call)
            waiting = later
            while len(batch) < self.max_batch:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._queue.put(None)  # stop after this batch
                    break
                (batch if first.batches_with(call) else waiting).append(call)
            self._execute(batch)

    def _execute(self, batch: list[_Call]) -> None:
        try:
            answers = run_batch(batch[0].signature, [call.inputs for call in batch])
        except BaseException as error:  # handed to every waiting request
            for call in batch:
                call.future.set_exception(error)
            return
        if batch[0].post is None:
            self._hand_out(batch, answers)
        elif batch[0].post_inline:  # cheap: here, no thread hop
            self._post_and_hand_out(batch, answers)
        else:  # on its own thread: the model's next batch need not wait for it
            self._post.submit(self._post_and_hand_out, batch, answers)

    def _post_and_hand_out(self, batch: list[_Call], answers: list[dict]) -> None:
        try:
            batch[0].post(answers)
        except BaseException as error:
            for call in batch:
                call.future.set_exception(error)
            return
        self._hand_out(batch, answers)

    @staticmethod
    def _hand_out(batch: list[_Call], answers: list[dict]) -> None:
        for call, answer in zip(batch, answers, strict=True):
            call.future.set_result(answer)
