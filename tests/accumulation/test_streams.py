"""Streams: an IterableDataset of unknown length windowed on the fly, the last partial window exact."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

import gaccum
from conftest import max_abs_diff, mlp, regression_data
from helpers import large_batch_train, window_plan


class Stream(IterableDataset):
    """(x, y) pairs read once, in order; split between DataLoader workers as PyTorch documents. No len()."""

    def __init__(self, n):
        self.x, self.y = regression_data(n)

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, len(self.x), step):
            yield self.x[i], self.y[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_trains_in_the_plans_window_and_its_last_partial_window_is_exact(workers):
    x, y = regression_data(23)  # windows of 4 + 3 + 3 = 10: 10, 10, then a flushed 3
    plan = window_plan([4, 3, 3])
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:10], y[:10]), (x[10:20], y[10:20]),
                                                                         (x[20:], y[20:])])
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), plan=plan)
    loader = plan.loader(Stream(23), num_workers=workers)
    assert isinstance(loader, gaccum.WindowStream)
    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for xb, yb in loader:
            sizes.append(len(xb))
            with acc.accumulate():
                acc.backward(F.mse_loss(ours(xb), yb))
        assert acc.flush().stepped
    assert sizes == [4, 3, 3, 4, 3, 3, 3] and acc.optimizer_steps == 3
    if workers == 0:  # with workers the stream's order interleaves, so the windows hold other samples
        assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_a_stream_sharded_by_rank_splits_every_sample_once():
    per_rank = [[float(v) for xb, _ in gaccum.window_loader(Stream(11), [2], shard=(r, 3)) for v in xb[:, 0]]
                for r in range(3)]
    assert [len(p) for p in per_rank] == [4, 4, 3]  # sample i on rank i % 3, as a DistributedSampler deals
    assert sorted(v for p in per_rank for v in p) == sorted(float(v) for v in Stream(11).x[:, 0])


def test_a_stream_refuses_a_sampler_and_shuffle_with_the_way_out():
    with pytest.raises(ValueError, match="shuffle inside the stream"):
        gaccum.window_loader(Stream(4), [2], shuffle=True)
    with pytest.raises(ValueError, match="shard"):
        gaccum.window_loader(Stream(4), [2], shard=(3, 2))
