"""What handing a cycle's work to the other training ranks costs: rank 0 broadcasts the settings, the blocks
and the previous adapter's files to every other rank over the process group (the machines share no disk).

    .venv/bin/python benchmarks/rank_handoff.py [--samples 2000] [--adapter-mb 162]

Two real processes, a real gloo group on this machine's loopback, a real `RankSpec` (blocks packed by our
packer from random tokens, the shipped 2,048-token length; adapter bytes of the 7B's size at r = 16:
40.4 M LoRA parameters in fp32 = 162 MB). Prints the seconds of the broadcast as each rank saw it, averaged
over three repeats. Across machines the transfer is bound by the network instead (162 MB at 10 Gbit/s:
0.13 s more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_spec(samples: int, adapter_mb: int):
    import numpy as np

    from codelupe_trainer.config import Settings
    from codelupe_trainer.data.packing import TokenizedSample, pack_best_fit
    from codelupe_trainer.training.distributed import RankSpec

    generator = np.random.default_rng(0)
    lengths = generator.integers(200, 2048, size=samples)
    sequences = [TokenizedSample(index, generator.integers(0, 152_064, size=int(length), dtype=np.int32))
                 for index, length in enumerate(lengths)]
    blocks = pack_best_fit(sequences, 2048)
    settings = Settings()
    adapter = {"adapter_model.safetensors": os.urandom(adapter_mb * 1_000_000), "adapter_config.json": b"{}" * 500}
    return RankSpec(settings.model, settings.training, adapter, blocks[:-20], blocks[-20:], 0, 0, True, True), \
        int(sum(lengths))


def rank_main(rank: int, port: int, samples: int, adapter_mb: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    spec, tokens = build_spec(samples, adapter_mb) if rank == 0 else (None, 0)
    for _ in range(3):
        dist.barrier()
        started = time.perf_counter()
        received = [spec]
        dist.broadcast_object_list(received, src=0)
        results.put((rank, time.perf_counter() - started, tokens, len(received[0].train_blocks)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--adapter-mb", type=int, default=162)
    arguments = parser.parse_args()

    import torch.multiprocessing as multiprocessing

    from codelupe_trainer.training.distributed import free_port

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=rank_main, args=(rank, port, arguments.samples, arguments.adapter_mb, results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    rows = [results.get(timeout=600) for _ in range(6)]
    for process in processes:
        process.join()
    tokens = max(row[2] for row in rows)
    blocks = rows[-1][3]
    print(f"rank hand-off: {arguments.samples} samples ({tokens:,} tokens, {blocks} training blocks of 2,048) + "
          f"{arguments.adapter_mb} MB of adapter files, gloo over loopback, 2 processes")
    for rank in (0, 1):
        seconds = [row[1] for row in rows if row[0] == rank]
        print(f"  rank {rank}: {statistics.mean(seconds):.2f} s per broadcast (min {min(seconds):.2f}, "
              f"max {max(seconds):.2f}, 3 repeats)")


if __name__ == "__main__":
    main()
