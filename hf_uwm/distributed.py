"""What the processes of one run (`accelerate launch`) exchange: nothing at all in a single process."""

from __future__ import annotations

import torch


def all_reduce_(tensors):
    """Sum each tensor over the processes, in place (nothing to do in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def broadcast_from_main(value):
    """The main process's `value` on every process (a dict of tensors comes back on each one's device)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    devices = _devices(value)
    shared = [_to_cpu(value)]
    dist.broadcast_object_list(shared, src=0)
    return _to_devices(shared[0], devices)


def _devices(value):
    return {k: v.device for k, v in value.items()} if isinstance(value, dict) and all(
        isinstance(v, torch.Tensor) for v in value.values()) else None


def _to_cpu(value):
    return {k: v.cpu() for k, v in value.items()} if _devices(value) is not None else value


def _to_devices(value, devices):
    return {k: v.to(devices[k]) for k, v in value.items()} if devices is not None else value
