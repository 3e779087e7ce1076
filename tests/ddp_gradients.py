"""Run by tests/test_distributed.py: two real gloo ranks compute the LoRA gradients of different batches
through PyTorch's DDP wrapper, once with the model's own loss and once with the chunked loss, and rank 0
prints what it gathered as JSON: the gradients every rank ended with, per loss.

    python tests/ddp_gradients.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def lora_gradients(rank: int, model_dir: str, port: int, loss: str) -> list[torch.Tensor] | None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.training.loss import chunked_model_loss

    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
    ids = torch.randint(5, base.config.vocab_size - 1, (2, 96), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    value = chunked_model_loss(wrapped, batch, chunk_tokens=50) if loss == "chunked" else wrapped(**batch).loss
    value.backward()
    flat = torch.cat([parameter.grad.flatten() for parameter in model.parameters() if parameter.requires_grad])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return gathered if rank == 0 else None


def rank_main(rank: int, model_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {loss: lora_gradients(rank, model_dir, port, loss) for loss in ("standard", "chunked")}
    if rank == 0:
        print(json.dumps({loss: [gradient.tolist() for gradient in per_rank] for loss, per_rank in results.items()}))
    # Both ranks out of the last collective, then out of the process without tearing the group down: gloo
    # aborted a rank in its teardown ("terminate called without an active exception", twice in CI on this 2-core
    # box, once after a barrier here) when its peer closed first. The results are printed; nothing is left to do.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
