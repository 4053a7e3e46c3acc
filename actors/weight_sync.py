"""Moving weights from the learner to the rollout engines.

Three transports, chosen by `rollout.transport` (see docs/grpo.md):

  object_store  the learner returns a {name: CPU tensor} dict; Ray puts it in the object store once
                and every rollout worker reads it (CPU runs, tests, small models).
  ipc           colocated on one GPU: the learner exports CUDA IPC handles of its tensors
                (`export_ipc` / `import_ipc`), the rollout rebuilds views of the same memory:
                no copy through the host.
  broadcast     separate GPUs: a standalone process group (NCCL on GPU, gloo on CPU for tests)
                of the learner's rank 0 and every rollout worker; rank 0 broadcasts the tensors.

The broadcast group is built directly from a TCPStore and a c10d backend object, so it does not
touch the default process group (which the learners use for data parallelism) and can include
processes that never called `init_process_group` (vLLM workers).

No Ray here: the caller (cluster/grpo_group.py) runs the two sides concurrently.
"""
from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

Named = dict[str, torch.Tensor]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover
        pass
    return "127.0.0.1"


class WeightGroup:
    """A process group of `world_size` ranks for broadcasting weights from rank 0.

    backend: "nccl" (tensors on the current CUDA device) or "gloo" (CPU tensors).
    Construction blocks until every rank has constructed its side: create all sides concurrently.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 600.0, device: torch.device | str | None = None):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight sync backend: expected 'nccl' or 'gloo', got {backend!r}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout,
                              wait_for_workers=False)
        self.store = dist.PrefixStore("weight_sync", store)
        if backend == "nccl":
            self.device = torch.device(device or "cuda")
            if self.device.index is None:  # set_device needs an index
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    # -- whole state dicts ----------------------------------------------------------------

    def send_state(self, state: Named) -> int:
        """Rank 0: broadcast the names/shapes/dtypes, then every tensor. Returns bytes sent."""
        meta = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()]
        self._send_bytes(pickle.dumps(meta))
        total = 0
        for k, v in state.items():
            t = v.detach().to(self.device).contiguous()
            self.broadcast(t)
            total += t.numel() * t.element_size()
        if self.backend == "nccl":
            torch.cuda.synchronize(self.device)
        return total

    def recv_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Other ranks: yield (name, tensor) in the sender's order, each received into a new buffer."""
        meta = pickle.loads(self._recv_bytes())
        for name, shape, dtype in meta:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self.broadcast(buf)
            yield name, buf

    def _send_bytes(self, data: bytes) -> None:
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self.broadcast(n)
        self.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device))

    def _recv_bytes(self) -> bytes:
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(n)
        buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(buf)
        return bytes(buf.cpu().numpy().tobytes())

    def close(self) -> None:
        self.pg = None
        self.store = None


# -- colocated CUDA IPC ----------------------------------------------------------------------

def export_ipc(state: Named) -> dict:
    """{name: (rebuild_fn, args)} CUDA IPC handles; keep `state` alive until the receiver is done."""
    from torch.multiprocessing.reductions import reduce_tensor

    return {k: reduce_tensor(v.detach().contiguous()) for k, v in state.items()}


def import_ipc(handles: dict, device_index: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Rebuild the tensors of `export_ipc` in this process (same physical GPU)."""
    for name, (fn, args) in handles.items():
        args = list(args)
        if device_index is not None:
            args[6] = device_index  # the GPU ordinal as this process numbers it
        yield name, fn(*args)


def state_bytes(state: Named) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())
