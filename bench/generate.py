"""Generation speed of image→audio: clips/s, s/clip, s per second of audio and TFLOP/s.

    python bench/generate.py CONFIG [--batches 1 64] [--steps 30] [--device auto]
                             [--precision auto] [--compile] [--runs R] [--min-seconds S]
                             [--threads N] [--im2wav-seconds-per-audio-second X] [--json F]

CONFIG is `paper` or `demo`, built as in bench/train_throughput.py, with random weights (speed
does not depend on them). For each batch size B the image→audio task (all image ids known, all
audio ids generated; random image ids) runs through the product's own `Unmasker`: the model's
public forward on the full sequence under autocast at the product's precision (auto: bf16 on a
recent GPU, fp32 on CPU), sampling and re-masking included, N steps at T = 9, once with
classifier-free guidance s = 3 (one forward of 2B rows per step) and once with s = 1 (one of B).
A warm-up run of the same shapes (2 steps: compilation and allocator growth) comes first, then
whole timed runs, each ended by a device synchronisation, until both `--runs` (default 2 on
CUDA, 1 on CPU) and `--min-seconds` (default 5 on CUDA, 0 on CPU) are reached. Every step
has the same shapes, so a run with fewer steps gives the per-step figure of a slow device; on a
CPU shared with other jobs `--threads 1` avoids OpenMP threads spinning against them.

Only the transformer's token generation is timed: encoding the image, decoding the audio ids to
a mel and the vocoder are left out, as in bench/im2wav_sampler.py, so the two compare.

TFLOP/s: clips/s x `flops_per_sample(cfg, layout, 0.0).forward` (one full-sequence forward;
matrix products and attention, docs/references.md, "The transformer's size and cost") x 2 with guidance x N. Seconds per second of
audio: s/clip over the clip length (`extract.clip_seconds`, 10 s). Given the same figure from
bench/im2wav_sampler.py on the same device (`--im2wav-seconds-per-audio-second`), the speed
ratio Im2Wav / this is printed.

Targets (the project's issue), `paper` with guidance on an H100/H200: >= 25 clips/s at batch 64,
<= 0.15 s per clip at batch 1. Not implemented here: CUDA graphs for small batches, and leaving
fully masked positions out of the encoder (the product runs neither).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The sibling bench script (this file's folder is on sys.path when run as a script): one place
# builds the `paper` / `demo` configs and knows the devices' peaks.
from train_throughput import build, device_peak  # noqa: E402

from pipeline.devices import choose_precision, resolve_device  # noqa: E402
from pipeline.inference.scheduler import Unmasker, UnmaskingScheduler  # noqa: E402
from pipeline.inference.tasks import task  # noqa: E402
from pipeline.models import AudioVisualTransformer, count_parameters  # noqa: E402
from pipeline.models.flops import flops_per_sample  # noqa: E402

TEMPERATURE = 9.0  # T (paper, params.yaml generate.temperature)
GUIDANCES = (3.0, 1.0)  # s = 3: the paper's CFG; s = 1: off
WARMUP_STEPS = 2
TARGET_CLIPS_PER_S_B64 = 25.0
TARGET_S_PER_CLIP_B1 = 0.15


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_setting(
    net: torch.nn.Module,
    layout,
    batch: int,
    steps: int,
    guidance: float,
    precision: str,
    device: torch.device,
    runs: int,
    min_seconds: float,
) -> tuple[float, int]:
    """Mean seconds per run of image→audio at `batch`, and how many runs were timed."""
    spec = task("image2audio", layout)
    known = spec.batch_known(batch, device)
    image = layout.modality("image")
    # Audio ids are ignored where `known` is False; the image ids are the condition.
    ids = {
        "audio": torch.zeros(batch, layout.modality("audio").length, dtype=torch.long),
        "image": torch.randint(0, image.codebook_size, (batch, image.length)),
    }
    ids = {m: v.to(device) for m, v in ids.items()}
    generator = torch.Generator(device=device).manual_seed(0)

    def unmasker(n: int) -> Unmasker:
        return Unmasker(net, layout, UnmaskingScheduler(n, TEMPERATURE, guidance), precision)

    unmasker(min(WARMUP_STEPS, steps)).run(ids, known, generator, spec.condition)
    timed = unmasker(steps)
    sync(device)
    done, start = 0, time.perf_counter()
    while done < runs or time.perf_counter() - start < min_seconds:
        timed.run(ids, known, generator, spec.condition)
        sync(device)
        done += 1
    return (time.perf_counter() - start) / done, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", choices=["paper", "demo"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=30, help="unmasking steps N (paper: 30)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--runs", type=int, help="least timed runs (default: 2 on CUDA, 1 on CPU)")
    ap.add_argument("--min-seconds", type=float, help="least timed seconds (5 on CUDA, 0 on CPU)")
    ap.add_argument(
        "--im2wav-seconds-per-audio-second",
        type=float,
        help="bench/im2wav_sampler.py's figure on the same device: prints the speed ratio",
    )
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's, one per core)"
    )
    ap.add_argument("--cuda-graphs", action="store_true", help="not implemented")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.cuda_graphs:
        raise SystemExit("--cuda-graphs is not implemented")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    params, model_cfg, layout = build(args.config, checkpointing=False)
    device = resolve_device(args.device)
    precision = choose_precision(args.precision, device)
    on_cuda = device.type == "cuda"
    runs = args.runs if args.runs is not None else (2 if on_cuda else 1)
    min_seconds = args.min_seconds if args.min_seconds is not None else (5.0 if on_cuda else 0.0)
    clip_seconds = params.extract.clip_seconds
    torch.manual_seed(0)
    model = AudioVisualTransformer(model_cfg, layout).to(device)
    net = torch.compile(model) if args.compile else model
    name, peak = device_peak(device)
    forward = flops_per_sample(model_cfg, layout, 0.0).forward

    results = []
    for batch in args.batches:
        for guidance in GUIDANCES:
            cfg = guidance != 1.0
            seconds, done = time_setting(
                net, layout, batch, args.steps, guidance, precision, device, runs, min_seconds
            )
            clips_s = batch / seconds
            s_clip = seconds / batch
            flops_clip = forward * (2 if cfg else 1) * args.steps
            tflops = clips_s * flops_clip / 1e12
            s_audio = s_clip / clip_seconds
            result = {
                "config": args.config,
                "parameters": count_parameters(model),
                "device": name,
                "precision": precision,
                "compile": args.compile,
                "batch": batch,
                "steps": args.steps,
                "temperature": TEMPERATURE,
                "guidance": guidance,
                "timed_runs": done,
                "s_per_run": round(seconds, 4),
                "ms_per_step": round(seconds / args.steps * 1e3, 3),
                "clips_per_s": round(clips_s, 3),
                "s_per_clip": round(s_clip, 5),
                "s_per_audio_second": round(s_audio, 6),
                "gflop_per_clip": round(flops_clip / 1e9, 1),
                "tflop_per_s": round(tflops, 4),
                "mfu": None if peak is None else round(tflops / peak, 4),
            }
            # Other jobs on a shared CPU slow every figure; the load says how much to trust them.
            load = (
                f" ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} on "
                f"{os.cpu_count()} cores)"
                if not on_cuda
                else ""
            )
            extra = ""
            if args.im2wav_seconds_per_audio_second is not None:
                ratio = args.im2wav_seconds_per_audio_second / s_audio
                result["im2wav_over_this"] = round(ratio, 2)
                extra += f", Im2Wav / this {ratio:.3g}x per second of audio at N={args.steps}"
            if args.config == "paper" and on_cuda and cfg and batch in (1, 64):
                met = (
                    clips_s >= TARGET_CLIPS_PER_S_B64
                    if batch == 64
                    else s_clip <= TARGET_S_PER_CLIP_B1
                )
                goal = (
                    f">= {TARGET_CLIPS_PER_S_B64:g} clips/s"
                    if batch == 64
                    else f"<= {TARGET_S_PER_CLIP_B1} s/clip"
                )
                result["target_met"] = met
                extra += f", target {goal} {'met' if met else 'MISSED'}"
            mfu = "" if peak is None else f", MFU {tflops / peak:.1%}"
            print(
                f"{args.config} ({result['parameters'] / 1e6:.1f}M params) image2audio batch "
                f"{batch} {'CFG s=3' if cfg else 'no CFG'} N={args.steps} T={TEMPERATURE:g} "
                f"{precision}{' compile' if args.compile else ''} on {name}{load}: "
                f"{seconds:.3f} s/run ({done} timed), {seconds / args.steps * 1e3:.1f} ms/step, "
                f"{clips_s:.3g} clips/s, {s_clip:.4g} s/clip, {s_audio:.4g} s per second of "
                f"audio, {tflops:.3g} TFLOP/s{mfu}{extra}"
            )
            results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
