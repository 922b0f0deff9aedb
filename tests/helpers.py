"""Reference training loops the tests compare gaccum against, and a port for gloo ranks."""

import socket

import torch
from torch import nn
import torch.nn.functional as F


def large_batch_train(model, opt, batches, loss_fn=F.mse_loss, scheduler=None, max_grad_norm=None):
    """One optimizer step per (x, y) batch: the ground truth accumulation must match."""
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def chunks(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def free_port():
    """A free loopback port for a test's own torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
