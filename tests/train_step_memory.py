"""One training step assembled from train.py's own pieces (build_model, parallelize, the batch, the objective, AdamW),
with the bytes of this rank's live tensors measured: what `train.py --dry-run` must predict. Called in a test's
process (one rank), or run as a script under torchrun, where rank 0 prints the result as JSON.

    torchrun --nproc_per_node 2 tests/train_step_memory.py --ckpt PIPE --data CORPUS --parallel fsdp ...
"""

import json
import os
import sys
from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor

import hub
import runtime
import train
import transfer


def held_bytes(tensors) -> int:
    """Bytes this rank holds of the tensors: an FSDP shard's local part."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def measure(argv: list[str]) -> dict:
    """{"parts": measured bytes per part of the plan, "caption_tokens": the longest caption of this rank's batch,
    "frozen_kept": whether every frozen tensor kept its bits through the step}. Activations are measured only when
    the model is not sharded (FSDP's gathered blocks would count as activations)."""
    args = train.resolved_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.world_size, args.global_batch = world, world * args.batch_size
    sharded = world > 1 or args.parallel == "fsdp"
    with runtime.process_group("gloo") if sharded else nullcontext():
        return measure_step(args, rank, world)


def measure_step(args, rank: int, world: int) -> dict:
    device, compute_dtype = runtime.pick_device_dtype(args.device, args.dtype)
    plan, head = transfer.make_plan(args.freeze, args.blocks), train.parse_head(args.head, args.head_widths)
    source = hub.load_pipeline(args.ckpt, compute_dtype, device, parts=("transformer",))
    corpus = train.Corpus(args.data, args.patch, args.max_pixels)
    model, _ = train.build_model(args, plan, head, source, device, compute_dtype, verbose=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    net = train.parallelize(model, args.parallel, world, device, compute_dtype, args.patch)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    batch = train.global_batch(0, args.global_batch, len(corpus), args.seed)
    batch = batch[rank * args.batch_size:(rank + 1) * args.batch_size]
    x0, sigma, noise = train.load_batch(corpus, batch, args, 0, train.training_sigmas(args.train_shift))
    captions = train.TextFeatures(args.ckpt, compute_dtype, device, None)([corpus.rows[i]["prompt"] for _, i in batch])
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    live = train.LiveTensors() if args.parallel == "ddp" else nullcontext()
    with live:
        with autocast:
            loss = train.flow_matching_loss(net, x0, noise, sigma, captions, args.patch)
        loss.backward()
    params = dict(model.named_parameters())
    parts = {"frozen weights": held_bytes(p for p in params.values() if not p.requires_grad),
             "trained weights": held_bytes(trained),
             "gradients": held_bytes(p.grad for p in trained if p.grad is not None)}
    if args.parallel == "ddp":
        parts["activations"] = live.peak(excluding={live.allocation(p.grad) for p in trained})
    optimizer.step()
    parts["optimizer state"] = held_bytes(t for s in optimizer.state.values() for t in s.values())
    frozen_kept = all(torch.equal(whole(params[n].detach()), t) for n, t in frozen.items())
    return {"parts": parts, "caption_tokens": max(len(c) for c in captions), "frozen_kept": frozen_kept}


if __name__ == "__main__":
    result = measure(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
