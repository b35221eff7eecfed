"""Sizing of the paper run on VGGSound: disk, work and wall time per stage, and what bounds each.

    .venv/bin/python bench/plan_vggsound.py [--train-clips 183730] [--test-clips 15446]
        [--download-nodes 16] [--download-workers 4] [--extract-cores 128] [--v100 32]
        [--h100 8] [--epochs 1000] ...

A calculator, not a measurement: it multiplies per-clip and per-sample figures by the clip
counts and prints a Markdown table. Each default below names its source: measured in
bench/README.md or docs/benchmarks.md, computed from the model and the params, or assumed where nothing
was measured (every assumption is a flag). Measure on the real cluster and pass the figures back.
Wall times assume perfect scaling over the given workers, GPUs or cores.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from pipeline.models import AudioVisualTransformer, count_parameters
from pipeline.models.flops import flops_per_sample
from pipeline.profiles import paper_params
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

# VGGSound, official train.csv / test.csv (docs/references.md, "VGGSound lists").
TRAIN_CLIPS = 183_730
TEST_CLIPS = 15_446

# The paper's token layout: 1024 codes per modality, audio 5x53 ids, image 16x16 ids, 10 frames.
LAYOUT = TokenLayout(
    ModalityLayout("audio", 1024, (5, 53)), ModalityLayout("image", 1024, (16, 16))
)
FRAMES = 10
MEL_SHAPE = (80, 848)  # SpecVQGAN's mel, stored as float16 by extract (docs/stages.md, "extract")

# download: pacing from params.yaml `download.vggsound` (sleep_interval 2.0 .. max_sleep_interval
# 6.0 -> 4.0 s on average before each clip; sleep_requests 0.75 s between extraction requests).
SLEEP_S = 4.0
SLEEP_REQUESTS_S = 0.75
REQUESTS_PER_CLIP = 3  # assumed: webpage, player, format manifest
FETCH_S = 3.0  # assumed: one ffmpeg section fetch of ~1 MB; no YouTube download was timed here
CLIP_MB = 0.8  # assumed: 10 s of <=360p H.264 (~0.5 Mbit/s) + AAC (128 kbit/s)

# extract: bench/README.md, `extract.py` on 320x240 @ 25 fps clips: 83.8 ms/clip per core, about
# the bare ffmpeg decode. Decoding scales with source pixels: x3 for VGGSound's 640x360.
EXTRACT_MS_PER_CLIP = 83.8 * (640 * 360) / (320 * 240)
FRAME_KB = 16.4  # assumed: a 256x256 JPEG at quality 90, ~2 bits per pixel
EXTRACT_CORES = 16 * 8  # infra/: extract's tasks on the CPU group, 16 x m5.2xlarge (8 vCPU)

# tokenize: bench/README.md, official-size encoders on an H200 in fp32 (batch 64): 212 images/s
# and 169 mels/s. V100 has no TF32/bf16, so fp32; its fp32 peak is 15.7 TFLOP/s against the
# H200's 67 (spec sheets): x4.27. Ray Data's overhead over a plain loop: +10.3% (bench/README.md,
# 880 clips on CPU).
IMAGES_PER_S_H200 = 212.0
MELS_PER_S_H200 = 169.0
V100_FP32_SLOWDOWN = 67.0 / 15.7
RAY_DATA_OVERHEAD = 0.103

# train: FLOPs per sample from pipeline.models.flops (840.6 GFLOP for the paper model at drop
# 0.5, bench/README.md). Dense fp16/bf16 peaks: V100 125, H100 989 TFLOP/s (bench/train_throughput.py).
# H100: the bench's target of 45% MFU at batch 128 bf16 (~530 samples/s), not yet measured.
# V100: 40% assumed, then x3/4 for activation checkpointing's recomputed forward (needed to fit
# 32 per GPU in 16 GB, bench/README.md).
V100_PEAK_TFLOPS = 125.0
H100_PEAK_TFLOPS = 989.0
V100_MFU = 0.40
H100_MFU = 0.45
CHECKPOINTING_COST = 4 / 3
# Network per node (spec sheets): p3.16xlarge 25 Gbit/s (p3dn.24xlarge: 100); p5.48xlarge (8 x
# H100) 3,200 Gbit/s EFA. 8 GPUs per node on both.
GPUS_PER_NODE = 8
V100_NODE_GBIT = 25.0
H100_NODE_GBIT = 3200.0
KEEP_CHECKPOINTS = 3  # profiles/paper.yaml train.keep_checkpoints
BYTES_PER_PARAM_CHECKPOINT = 12  # fp32 weights + AdamW's two moments
BYTES_PER_PARAM_EXPORT = 4

# evaluate: bench/README.md's generation target on H100, `paper` with CFG at batch 64: 25 clips/s
# (N = 30; not yet measured). Without CFG half the forwards. V100 scaled by the peak ratio.
GEN_CLIPS_PER_S_H100 = 25.0

GB = 1e9


@dataclass(frozen=True)
class Row:
    stage: str
    disk_gb: float
    work: float
    unit: str
    wall_h: float
    resources: str
    bound: str


@dataclass(frozen=True)
class Gpus:
    """The GPUs of one training row."""

    name: str
    count: int
    peak_tflops: float
    mfu: float
    mfu_source: str
    recompute: float  # hardware work over counted work (activation checkpointing: 4/3)
    node_gbit: float
    precision: str

    @property
    def flops_per_s(self) -> float:
        """Counted (model) FLOP/s of one GPU."""
        return self.peak_tflops * 1e12 * self.mfu / self.recompute


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-clips", type=int, default=TRAIN_CLIPS)
    p.add_argument("--test-clips", type=int, default=TEST_CLIPS)
    p.add_argument(
        "--download-nodes",
        type=int,
        default=16,
        help="nodes that download, each its own IP (profiles/paper.yaml: download.ray.nodes)",
    )
    p.add_argument(
        "--download-workers", type=int, default=4, help="per node: download.vggsound.workers"
    )
    p.add_argument("--fetch-s", type=float, default=FETCH_S, help="seconds to fetch one clip")
    p.add_argument("--sleep-s", type=float, default=SLEEP_S, help="mean pause before a clip")
    p.add_argument("--sleep-requests-s", type=float, default=SLEEP_REQUESTS_S)
    p.add_argument("--requests-per-clip", type=int, default=REQUESTS_PER_CLIP)
    p.add_argument("--clip-mb", type=float, default=CLIP_MB, help="MB per downloaded clip")
    p.add_argument("--extract-ms", type=float, default=EXTRACT_MS_PER_CLIP, help="CPU ms/clip")
    p.add_argument("--frame-kb", type=float, default=FRAME_KB, help="KB per stored JPEG frame")
    p.add_argument(
        "--extract-cores",
        type=int,
        default=EXTRACT_CORES,
        help="cores extract's tasks run on (executor: ray; local: the one machine's)",
    )
    p.add_argument("--images-per-s", type=float, default=IMAGES_PER_S_H200)
    p.add_argument("--mels-per-s", type=float, default=MELS_PER_S_H200)
    p.add_argument("--v100-fp32-slowdown", type=float, default=V100_FP32_SLOWDOWN)
    p.add_argument("--v100", type=int, default=32, help="V100s for tokenize, train, evaluate")
    p.add_argument("--h100", type=int, default=8, help="H100s for the comparison train row")
    p.add_argument("--v100-mfu", type=float, default=V100_MFU)
    p.add_argument("--h100-mfu", type=float, default=H100_MFU)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument(
        "--global-batch", type=int, default=1024, help="profiles/paper.yaml train.batch_size"
    )
    p.add_argument("--v100-node-gbit", type=float, default=V100_NODE_GBIT)
    p.add_argument("--h100-node-gbit", type=float, default=H100_NODE_GBIT)
    p.add_argument("--gen-clips-per-s", type=float, default=GEN_CLIPS_PER_S_H100)
    args = p.parse_args(argv)
    for name in (
        "train_clips", "test_clips", "download_nodes", "download_workers", "extract_cores",
        "v100", "h100", "global_batch",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def paper_parameters() -> int:
    with torch.device("meta"):
        return count_parameters(AudioVisualTransformer(paper_params().model, LAYOUT))


def plan(args: argparse.Namespace) -> list[Row]:
    """One row per stage (train twice: V100 and H100); see the module docstring."""
    clips = args.train_clips + args.test_clips
    rows = []

    per_clip_s = args.fetch_s + args.sleep_s + args.requests_per_clip * args.sleep_requests_s
    worker_h = clips * per_clip_s / 3600
    nodes = args.download_nodes
    rows.append(
        Row(
            "download",
            clips * args.clip_mb * 1e6 / GB,
            worker_h,
            "worker-h",
            worker_h / (args.download_workers * nodes),
            f"{nodes} node(s) x {args.download_workers} yt-dlp workers, one IP each",
            "YouTube's pacing and rate limits per IP (more workers per IP trip bot checks; more "
            "nodes add IPs), not bandwidth",
        )
    )

    mel_bytes = MEL_SHAPE[0] * MEL_SHAPE[1] * 2
    extract_bytes = FRAMES * args.frame_kb * 1e3 + mel_bytes
    cpu_h = clips * args.extract_ms / 1e3 / 3600
    rows.append(
        Row(
            "extract",
            clips * extract_bytes / GB,
            cpu_h,
            "CPU-h",
            cpu_h / args.extract_cores,
            f"{args.extract_cores} cores (Ray tasks)",
            "CPU: the ffmpeg decode (extract costs about a bare decode)",
        )
    )

    id_bytes = 2 * (FRAMES * LAYOUT.image.length + LAYOUT.audio.length)
    image_s, mel_s = FRAMES / args.images_per_s, 1 / args.mels_per_s
    clip_s = (image_s + mel_s) * args.v100_fp32_slowdown * (1 + RAY_DATA_OVERHEAD)
    v100_h = clips * clip_s / 3600
    rows.append(
        Row(
            "tokenize",
            clips * id_bytes / GB,
            v100_h,
            "V100-h",
            v100_h / args.v100,
            f"{args.v100} V100, fp32",
            f"GPU: the image encoder ({FRAMES} frames per clip, "
            f"{image_s / (image_s + mel_s):.0%} of the work)",
        )
    )

    params = paper_parameters()
    train_disk = params * (KEEP_CHECKPOINTS * BYTES_PER_PARAM_CHECKPOINT + BYTES_PER_PARAM_EXPORT)
    sample_flops = flops_per_sample(paper_params().model, LAYOUT, drop_ratio=0.5).training
    steps = args.epochs * args.train_clips / args.global_batch
    for gpu in (
        Gpus("V100", args.v100, V100_PEAK_TFLOPS, args.v100_mfu, "assumed", CHECKPOINTING_COST,
             args.v100_node_gbit, "fp16 + checkpointing"),
        Gpus("H100", args.h100, H100_PEAK_TFLOPS, args.h100_mfu, "target", 1.0,
             args.h100_node_gbit, "bf16"),
    ):  # fmt: skip
        compute_s = args.global_batch / gpu.count * sample_flops / gpu.flops_per_s
        nodes = -(-gpu.count // GPUS_PER_NODE)
        # Gradients are all-reduced across nodes once per step: 2 (n-1)/n of the fp32 gradients
        # cross each node's network link (NVLink inside a node is not the limit).
        comm_s = 2 * (nodes - 1) / nodes * params * 4 * 8 / (gpu.node_gbit * 1e9)
        step_s = max(compute_s, comm_s)  # DDP overlaps the all-reduce with the backward
        if comm_s > compute_s:
            bound = (
                f"inter-node network: all-reduce {comm_s:.2f} s/step > compute {compute_s:.2f} s"
            )
        else:
            bound = (
                f"GPU compute at {gpu.mfu:.0%} MFU ({gpu.mfu_source}): {compute_s:.2f} s/step, "
                f"all-reduce {comm_s:.2f} s"
            )
        rows.append(
            Row(
                f"train ({gpu.name})",
                train_disk / GB,
                steps * compute_s * gpu.count / 3600,
                f"{gpu.name}-h",
                steps * step_s / 3600,
                f"{gpu.count} {gpu.name} in {nodes} node(s), {gpu.precision}",
                bound,
            )
        )

    # guidance [3.0, 1.0] (params evaluate.guidance): one pass with CFG, one at half the cost.
    gen_s = (1 + 0.5) / args.gen_clips_per_s * H100_PEAK_TFLOPS / V100_PEAK_TFLOPS
    eval_h = args.test_clips * gen_s / 3600
    rows.append(
        Row(
            "evaluate",
            0.0,
            eval_h,
            "V100-h",
            eval_h / args.v100,
            f"{args.v100} V100, fp16",
            "GPU: 30 unmasking steps x 2 forwards (CFG) per clip and setting",
        )
    )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| stage | disk (GB) | work | unit | wall (h) | resources | bound by |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.stage} | {r.disk_gb:,.2f} | {r.work:,.2f} | {r.unit} | {r.wall_h:,.2f} | "
            f"{r.resources} | {r.bound} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = plan(args)
    print(
        f"VGGSound: {args.train_clips:,} train + {args.test_clips:,} test clips; "
        f"{args.epochs} epochs; figures and their sources in bench/plan_vggsound.py\n"
    )
    print(table(rows))
    print(
        "\nDisk: download is an upper bound (every listed clip fetched); train is S3"
        f" ({KEEP_CHECKPOINTS} checkpoints of weights + AdamW, and the export); evaluate keeps"
        " metrics and a few samples. A DVC cache that copies instead of linking doubles"
        " download, extract and tokenize. Train work counts compute only; its wall time is"
        " max(compute, all-reduce) per step."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
