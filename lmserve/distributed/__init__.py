"""Tensor parallelism: the process group and collectives, how tensors shard, and the worker ranks."""
