"""Training throughput of the transformer: samples/s, tokens/s, TFLOP/s, MFU and peak memory.

    python bench/train_throughput.py CONFIG BATCH [--steps 10] [--warmup 3] [--precision auto]
                                     [--compile] [--checkpointing] [--device auto] [--image-grid G]

CONFIG is `paper` (ViT-L encoder + 1024-wide decoder, 1024 codes per modality, 5x53 + 16x16 ids)
or `demo` (the `model:` section of params.yaml, the demo tokenizers' codebooks and image grid,
`extract.image_size` over the image VQGAN's downsampling). The timed step is the `train` stage's own (`pipeline.training.loop.train_step`): the training mask and
drop drawn on the CPU, autocast, masked cross-entropy, backward, clipping, AdamW (fused on
CUDA). Warm-up steps run first; the timed steps end with a device synchronisation.

FLOPs per sample: `pipeline.models.flops` (3 x forward; matrix products and attention, 840.6
GFLOP for `paper`). MFU divides the achieved FLOP/s by the device's dense bf16/fp16 peak
(H100/H200: 989 TFLOP/s); activation checkpointing's recomputation is not counted as work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.devices import choose_precision, resolve_device  # noqa: E402
from pipeline.masking import mask_for_training  # noqa: E402
from pipeline.models import AudioVisualTransformer, count_parameters  # noqa: E402
from pipeline.models.flops import flops_per_sample  # noqa: E402
from pipeline.profiles import paper_params  # noqa: E402
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout  # noqa: E402
from pipeline.tokenizers.tokenizer import InputSpec, vqgan_config  # noqa: E402
from pipeline.training.loop import train_step  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, by device-name substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "V100": 125.0}


def device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def saved_for_backward(net, model, batch, train_cfg, precision: str) -> int:
    """Bytes the autograd graph of one forward keeps for the backward pass, parameters left out
    (they are resident anyway), counted by storage through saved-tensor hooks, so the count
    does not depend on the device's allocator. Under activation checkpointing only the block
    inputs are kept (recomputed blocks are not counted). Autocast's low-precision weight copies
    are counted: they are kept for the backward."""
    from pipeline.devices import autocast
    from pipeline.training.objective import compute_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, autocast(batch.inputs["audio"].device, precision):
        loss, _ = compute_loss(net, batch, train_cfg.label_smoothing)
    del loss
    return sum(storages.values())


def build(config: str, checkpointing: bool, image_grid: int | None = None):
    params = load_params()
    if config == "paper":
        model_cfg, codes, grid = paper_params().model, (1024, 1024), 16
    elif config == "demo":
        model_cfg = params.model
        image = params.tokenizers.image.arch
        codes = (params.tokenizers.audio.arch.n_embed, image.n_embed)
        size = params.extract.image_size
        grid = vqgan_config(image, InputSpec("image", (3, size, size))).grid(size, size)[0]
    else:
        raise SystemExit(f"unknown CONFIG {config!r}: paper or demo")
    model_cfg = dataclasses.replace(model_cfg, activation_checkpointing=checkpointing)
    grid = image_grid or grid
    layout = TokenLayout(
        ModalityLayout("audio", codes[0], (5, 53)), ModalityLayout("image", codes[1], (grid, grid))
    )
    return params, model_cfg, layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", choices=["paper", "demo"])
    ap.add_argument("batch", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--image-grid", type=int, help="image ids per side (default: paper 16, demo from params)"
    )
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only count the activations one step keeps (no timing): paper-size on a CPU",
    )
    args = ap.parse_args()

    params, model_cfg, layout = build(args.config, args.checkpointing, args.image_grid)
    device = resolve_device(args.device)
    precision = choose_precision(args.precision, device)
    train_cfg = dataclasses.replace(params.train, batch_size=args.batch)
    torch.manual_seed(0)
    model = AudioVisualTransformer(model_cfg, layout).to(device)
    net = torch.compile(model) if args.compile else model
    opt, _ = build_optimizer(model, train_cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g = torch.Generator().manual_seed(0)
    ids = {
        m: torch.randint(
            0, layout.modality(m).codebook_size, (args.batch, layout.modality(m).length)
        )
        for m in ("audio", "image")
    }

    def step() -> None:
        batch = mask_for_training(layout, ids, train_cfg.masking, g).to(device)
        train_step(net, model, batch, opt, scaler, train_cfg, precision)

    saved = saved_for_backward(
        net,
        model,
        mask_for_training(layout, ids, train_cfg.masking, g).to(device),
        train_cfg,
        precision,
    )
    if args.memory_only:
        one = {m: v[:1] for m, v in ids.items()}
        single = saved_for_backward(
            net,
            model,
            mask_for_training(layout, one, train_cfg.masking, g).to(device),
            train_cfg,
            precision,
        )
        per_sample = (saved - single) / max(1, args.batch - 1)
        states = count_parameters(model) * 16  # fp32 weights, grads, AdamW exp_avg, exp_avg_sq
        print(
            f"{args.config} batch {args.batch} {precision}"
            f"{' ckpt' if args.checkpointing else ''}: saved for backward "
            f"{saved / 2**30:.3f} GiB ({per_sample / 2**20:.1f} MiB per sample + "
            f"{(single - per_sample) / 2**30:.3f} GiB fixed); with weights, grads and AdamW "
            f"states ({states / 2**30:.2f} GiB) a lower bound on the step's peak of "
            f"{(states + saved) / 2**30:.2f} GiB"
        )
        return
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    flops = flops_per_sample(model_cfg, layout, train_cfg.masking.drop_ratio).training
    samples_s = args.batch / seconds
    tflops = samples_s * flops / 1e12
    name, peak = device_peak(device)
    if device.type == "cuda":
        memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        memory_kind = "peak allocated"
    else:
        memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory_kind = "process peak RSS"
    result = {
        "config": args.config,
        "parameters": count_parameters(model),
        "batch": args.batch,
        "precision": precision,
        "compile": args.compile,
        "activation_checkpointing": args.checkpointing,
        "device": name,
        "step_ms": round(seconds * 1e3, 2),
        "samples_per_s": round(samples_s, 2),
        "tokens_per_s": round(samples_s * layout.seq_len),
        "gflop_per_sample": round(flops / 1e9, 2),
        "tflop_per_s": round(tflops, 3),
        "mfu": None if peak is None else round(tflops / peak, 4),
        "peak_memory_gib": round(memory_gib, 2),
        "saved_for_backward_gib": round(saved / 2**30, 3),
        "memory_kind": memory_kind,
    }
    mfu = "n/a (no dense peak for this device)" if peak is None else f"{tflops / peak:.1%}"
    print(
        f"{args.config} ({result['parameters'] / 1e6:.1f}M params) batch {args.batch} "
        f"{precision}{' compile' if args.compile else ''}"
        f"{' ckpt' if args.checkpointing else ''} on {name}: "
        f"{seconds * 1e3:.1f} ms/step, {samples_s:.1f} samples/s, "
        f"{result['tokens_per_s']:,} tokens/s, {tflops:.3g} TFLOP/s, MFU {mfu}, "
        f"{memory_kind} {memory_gib:.2f} GiB, saved for backward {saved / 2**30:.3f} GiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
