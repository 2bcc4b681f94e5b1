"""Processes: torchrun setup, gradients and metrics averaged over ranks, Ctrl-C, peak memory.

Data parallelism is written out by hand (`all_reduce_gradients`): policy.token_logprobs calls
model.base_model and the output head directly, so a DDP wrapper's hooks would never fire, and
averaging the gradients is all DDP would do here (ranks start from the same weights and take the
same steps). Under --fsdp the reduce-scatter of backward averages them instead (infra/fsdp.py).
"""
import os
import resource
import signal

import torch
import torch.distributed as dist
from tqdm import tqdm


def setup(device, threads):
    """torchrun sets RANK/WORLD_SIZE: one process per GPU (nccl) or per CPU worker (gloo).
    -> (rank, world size, this rank's device)."""
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def rank_world():
    """(rank, world size): torchrun's process group if one is up, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_gradients(model, world):
    """Every gradient averaged over the ranks (what DDP would do)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def average_over_ranks(metrics, world):
    """Every metric averaged over ranks (so a Ctrl-C on any rank stops them all)."""
    if world == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(metrics, (values / world).tolist()))


def peak_memory_mb():
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def catch_signals():
    """Ctrl-C (or SIGTERM: torchrun's stop, a cluster's preemption) finishes the current step,
    saves it and exits: a checkpoint taken mid-update would hold weights between two steps and
    could never be resumed exactly. A second signal aborts at once. -> a list, non-empty once a
    signal came."""
    stop = SignalFlag()
    stop.previous = {sig: signal.signal(sig, stop.on_signal)
                     for sig in (signal.SIGINT, signal.SIGTERM)}
    return stop


class SignalFlag(list):
    def on_signal(self, *_):
        if self:
            raise KeyboardInterrupt
        self.append(1)
        tqdm.write("stopping: finishing this step, then saving "
                   "(Ctrl-C again aborts without saving)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
