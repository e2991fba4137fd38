"""Where the next training batch is cut while the current step runs."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


def batch_executor(device: torch.device) -> ThreadPoolExecutor | InlineExecutor:
    """On CUDA, a background thread cuts the next batch while the GPU runs this step. On a CPU, the batch
    is cut inline: cutting costs about 1 % of a CPU step, and a thread bought nothing measurable there
    (scripts/benchmark.py section b: within noise of inline), while it is one more thread on the cores
    that torch's threads use."""
    return prefetch_pool() if device.type == "cuda" else InlineExecutor()


class InlineExecutor:
    """The executor interface without a thread: submit() cuts the batch at once, in the training thread."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None


def prefetch_pool() -> ThreadPoolExecutor:
    """The one background thread that cuts the next batch while the current one trains.

    It runs torch ops with a single intra-op thread: cutting a batch is a few small copies, and a second
    OpenMP team of torch's default size would compete with the training step's own threads for the cores
    (epochs about 8 % slower on 2 cores, measured with scripts/benchmark.py's epoch loop).
    """
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1, initializer=_one_intra_op_thread)
    pool.submit(lambda: None).result()  # start the thread now, so its setting is in place before ours
    torch.set_num_threads(threads)  # set_num_threads also sets the default of threads started later
    return pool


def _one_intra_op_thread() -> None:
    # torch sets a thread's count up lazily, from the global default, at the thread's first query or
    # parallel op; query first, so that this setting is not replaced by that lazy set-up later.
    torch.get_num_threads()
    torch.set_num_threads(1)
