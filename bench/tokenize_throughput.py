"""Benchmark: the tokenize stage's Ray Data job against a plain PyTorch loop on the same clips.

    .venv/bin/python bench/tokenize_throughput.py [--work DIR] [--classes 8] [--train 10] [--test 2]
                                       [--image-size 64] [--repeat 2] [--save-gpu-inputs] [--json F]
    python3 bench/tokenize_throughput.py --gpu-only [--work DIR]          (a CUDA machine; Ray not needed)
    .venv/bin/python bench/tokenize_throughput.py --official-device cpu --official-batch 2 \
        --official-crop 32 ...                      (the encoder part's code path on a CPU, tiny)

Pipeline part (CPU, or CUDA for both sides when present): renders classes x (train + test)
synthetic clips with the real generator, extracts them at --image-size, saves random-init
tokenizers of the demo architectures (params.yaml `tokenizers.image/audio.arch`), then times
`tokenize_plain` (a plain PyTorch loop: read shards, decode JPEGs + mels, encode) and
`run_tokenize` (the Ray Data job + compaction, params.yaml `tokenize` settings) on the same
data, interleaved, the best of --repeat runs each. Ray's start-up is timed apart and left out
of the overhead = (Ray - plain) / plain; target <= 15 %. The load average is printed because
other processes on the machine skew both sides.

GPU part (only when torch sees CUDA): images/s of the official image VQGAN encoder
(IMAGENET_F16_1024) at 256x256, batch 64, and mels/s of the official audio one
(VGGSOUND_CODEBOOK, 80x848), in fp32, TF32 and bf16, with the share of ids equal to fp32's;
then the demo tokenizers through `tokenize_plain` on cuda per precision against cpu fp32, when
WORK holds the prepared data. Weights are random, so agreement is only indicative of trained
ones. The official encoders eat frames and mels of synthetic clips rendered at 256x256
(`WORK/gpu_inputs.npz`, written here with --save-gpu-inputs, since making mels needs librosa).
`--official-device cpu` runs that part on a CPU (every precision is fp32 there), with
`--official-crop S` cutting frames to S x S and mels to their first S frames: a smoke run of the
code path (bench/gpu_check.sh --dry), not a figure.

The pipeline part needs ffmpeg only to make WORK: a WORK made elsewhere (its `made-*` stamp
there) is reused as it is. `--json F` also writes every figure to F.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Ray starts every worker with OMP_NUM_THREADS set (to its CPUs); without it, torch's CPU convs
# ran 3-4x slower on 2 threads on the 2-core VM this was written on. Same setting both sides.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.machine import machine  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import extract, extracted, tokens  # noqa: E402
from pipeline.ray_runtime import ray_session  # noqa: E402
from pipeline.tokenizers import batch_tokenize as bt  # noqa: E402
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer, vqgan_config  # noqa: E402
from pipeline.tokenizers.vqgan import IMAGENET_F16_1024, VGGSOUND_CODEBOOK, VQModel  # noqa: E402

GPU_BATCH = 64
OFFICIAL_FRAME_SIZE = 256  # the official image encoder's frames (IMAGENET_F16_1024)


def device_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{machine()}, {gpu}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------ data


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Synthetic clips -> extract -> random-init demo tokenizers; reused when already there
    (the clips and extract by their stamp, which a WORK made elsewhere brings along)."""
    from pipeline.data.manifest import write_manifest
    from pipeline.data.synthetic import generate_dataset

    params = load_params()
    synth = replace(
        params.download.synthetic,
        num_classes=args.classes,
        train_per_class=args.train,
        test_per_class=args.test,
    )
    clips, extract_dir, tok = work / "clips", work / "extract", work / "tokenizers"
    stamp = work / f"made-{args.classes}x{args.train}+{args.test}-{args.image_size}"
    if not stamp.exists():
        shutil.rmtree(work, ignore_errors=True)
        records = generate_dataset(
            synth, clips, seed=0, splits=("train", "test"), classes=(), limit=0, previous=[]
        )
        write_manifest(clips, records)
        extract.run_extract(
            replace(params.extract, image_size=args.image_size), clips, extract_dir, work / "cache"
        )
        stamp.touch()
    if not (tok / "audio").is_dir():
        torch.manual_seed(0)
        specs = {
            "image": InputSpec("image", (3, args.image_size, args.image_size)),
            "audio": InputSpec("mel", (1, params.extract.n_mels, params.extract.mel_frames)),
        }
        for modality, spec in specs.items():
            arch = getattr(params.tokenizers, modality).arch
            model = VQModel(vqgan_config(arch, spec))
            Tokenizer(modality, model, spec, {"source": "random-init"}).save(tok / modality)
    return extract_dir, tok


def save_gpu_inputs(path: Path, count: int = GPU_BATCH) -> None:
    """`count` frames (256x256, one per clip) and mels of synthetic clips, rendered directly."""
    from pipeline.data.audio import log_mel
    from pipeline.data.synthetic import clip_specs, render_clip

    params = load_params()
    per_class = -(-count // params.download.synthetic.num_classes)
    synth = replace(
        params.download.synthetic,
        width=OFFICIAL_FRAME_SIZE,
        height=OFFICIAL_FRAME_SIZE,
        fps=1,
        train_per_class=per_class,
    )
    specs = [s for s in clip_specs(synth) if s.split == "train"][:count]
    frames, mels = [], []
    for spec in specs:
        arrays = render_clip(synth, spec, seed=0)
        frames.append(arrays.frames[len(arrays.frames) // 2])
        mels.append(log_mel(arrays.audio, params.extract).astype(np.float16))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, frames=np.stack(frames), mels=np.stack(mels))
    print(f"gpu inputs: {len(frames)} frames {frames[0].shape} + mels {mels[0].shape} -> {path}")


# ------------------------------------------------------------------------------------ CPU part


def _plain_run(
    extract_dir: Path, tok: Path, precision: str, batch_size: int, device: str
) -> tuple[float, dict]:
    start = time.perf_counter()
    ids = bt.tokenize_plain(extract_dir, tok, precision, batch_size=batch_size, device=device)
    return time.perf_counter() - start, ids


def plain_in_fresh_process(*args) -> tuple[float, dict]:
    """`tokenize_plain` timed in a new process (imports not counted), so that it starts as cold
    as a Ray actor does: no kernel caches or warm allocator from an earlier run."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_plain_run, *args).result()


def bench_pipeline(work: Path, args: argparse.Namespace) -> dict:
    """Plain loop vs Ray stage on the main set and on a small one (8 x (1 + 1) clips): the small
    set measures the fixed cost of a Ray job, the difference the per-clip (marginal) overhead.
    A main set no larger than the small one is timed alone. Returns the figures."""
    sets = {"main": prepare(work, args)}
    if (args.train, args.test) != (1, 1):
        sets["small"] = prepare(
            work / "small", argparse.Namespace(**{**vars(args), "train": 1, "test": 1})
        )
    params = load_params()
    cuda = torch.cuda.is_available()
    cfg = replace(params.tokenize, num_gpus_per_actor=1 if cuda else 0, output_uri="")
    device = "cuda" if cuda else "cpu"
    print(
        f"tokenize batch_size {cfg.batch_size}, {cfg.num_actors} actor(s), "
        f"{cfg.num_gpus_per_actor} GPU each, {cfg.precision}, {args.image_size}px frames"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    clips, plain_s, ray_s, job_s, same = {}, {}, {}, {}, {}
    with ray_session() as startup_s:
        for name, (extract_dir, tok) in sets.items():
            meta = extracted.load_meta(extract_dir)
            clips[name] = sum(meta["counts"].values())
            out = work / f"tokens-{name}"
            plain_s[name], ray_s[name], job_s[name] = [], [], []
            # Interleaved, so that load from other processes hits both sides alike.
            for _ in range(args.repeat):
                seconds, plain = plain_in_fresh_process(
                    extract_dir, tok, cfg.precision, cfg.batch_size, device
                )
                plain_s[name].append(seconds)
                start = time.perf_counter()
                summary = bt.run_tokenize(cfg, extract_dir, tok, out, work / "cache")
                ray_s[name].append(time.perf_counter() - start)
                job_s[name].append(summary.ray_seconds)
            same[name] = all(
                np.array_equal(ex.image_ids, plain[ex.clip_id][0])
                and np.array_equal(ex.audio_ids, plain[ex.clip_id][1])
                for split in meta["counts"]
                for ex in tokens.iter_tokens(out, split)
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"Ray start-up (not counted): {startup_s:.1f} s")
    best = {n: (min(plain_s[n]), min(ray_s[n]), min(job_s[n])) for n in sets}
    for name in sets:
        p, r, j = best[name]
        print(
            f"{name:5s} {clips[name]:4d} clips | plain loop {clips[name] / p:6.2f} clips/s "
            f"({p:.2f} s) | Ray stage {clips[name] / r:6.2f} clips/s ({r:.2f} s, job {j:.2f} s) "
            f"| overhead {(r - p) / p * 100:+.0f} % "
            f"| ids identical: {'yes' if same[name] else 'NO'}"
        )
        print(
            f"      runs plain {', '.join(f'{x:.2f}' for x in plain_s[name])}; "
            f"Ray {', '.join(f'{x:.2f}' for x in ray_s[name])}"
        )
    pm, rm, _ = best["main"]
    result = {
        "clips": clips,
        "device": device,
        "ray_startup_s": round(startup_s, 3),
        "plain_s": {n: round(v[0], 4) for n, v in best.items()},
        "ray_s": {n: round(v[1], 4) for n, v in best.items()},
        "ray_job_s": {n: round(v[2], 4) for n, v in best.items()},
        "ids_identical": all(same.values()),
        "overhead": round((rm - pm) / pm, 4),
    }
    parts = ""
    if "small" in best:
        ps, rs, _ = best["small"]
        result["fixed_s"] = round(rs - ps, 3)
        result["marginal"] = round(((rm - rs) - (pm - ps)) / (pm - ps), 4)
        parts = (
            f" = a fixed ~{rs - ps:.1f} s per job + {result['marginal'] * 100:+.1f} % per clip "
            f"(from the {clips['main'] - clips['small']} clips the sets differ by)"
        )
    print(
        f"Ray overhead (start-up excluded): {(rm - pm) / pm * 100:+.1f} % on {clips['main']} clips "
        f"(target <= 15 %){parts}"
    )
    return result


# ------------------------------------------------------------------------------------ GPU part


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeat: int, device: str = "cuda") -> float:
    fn()  # warm-up: cuDNN algorithm choice, allocator
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def bench_gpu(
    inputs: Path,
    repeat: int,
    device: str = "cuda",
    batch_size: int = GPU_BATCH,
    crop: int | None = None,
) -> list[dict]:
    """Images/s and mels/s of the official encoders per precision, with the share of ids equal
    to fp32's; `crop` (a multiple of 16) cuts frames to crop x crop and mels to their first
    `crop` frames (a smoke run's size). Returns one dict per (modality, precision)."""
    data = np.load(inputs)
    frames, mels = data["frames"], data["mels"]
    if crop:
        frames, mels = frames[:, :crop, :crop], mels[:, :, :crop]
    frames = np.resize(frames, (batch_size, *frames.shape[1:]))
    mels = np.resize(mels, (batch_size, *mels.shape[1:])).astype(np.float32)
    cases = [
        ("image", IMAGENET_F16_1024, InputSpec("image", (3, *frames.shape[1:3])), frames, "images"),
        ("audio", VGGSOUND_CODEBOOK, InputSpec("mel", (1, *mels.shape[1:])), mels, "mels"),
    ]
    torch.manual_seed(0)
    results = []
    for modality, cfg, spec, batch, unit in cases:
        tok = Tokenizer(modality, VQModel(cfg).to(device), spec, {})
        x = tok.preprocess(batch)
        ref = None
        for precision in bt.PRECISIONS:
            with bt.encoder_numerics(precision, device) as effective:
                seconds = _time(lambda tok=tok, x=x: tok.model.encode(x), repeat, device)
                ids = tok.model.encode(x).cpu().numpy()
            ref = ids if ref is None else ref
            agree = float((ids == ref).mean())
            print(
                f"{modality} official encoder {tuple(spec.shape)} batch {batch_size} {precision} "
                f"on {device}{'' if effective == precision else f' (ran as {effective})'}: "
                f"{batch_size / seconds:8.1f} {unit}/s, ids equal to fp32: {agree:.2%}"
            )
            results.append(
                {
                    "modality": modality,
                    "shape": list(spec.shape),
                    "batch": batch_size,
                    "device": device,
                    "precision": precision,
                    "effective_precision": effective,
                    "unit": unit,
                    "per_s": round(batch_size / seconds, 2),
                    "ids_equal_fp32": round(agree, 5),
                }
            )
        del tok, x
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


def bench_demo_cuda(work: Path) -> list[dict]:
    """The demo tokenizers through `tokenize_plain` on cuda per precision, against cpu fp32."""
    extract_dir, tok = work / "extract", work / "tokenizers"
    if not (extract_dir / "meta.json").exists() or not (tok / "image").exists():
        print(f"demo-tokenizer part skipped: no prepared data in {work}")
        return []
    results = []
    ref = bt.tokenize_plain(extract_dir, tok, "fp32", batch_size=64, device="cpu")
    for precision in bt.PRECISIONS:
        bt.tokenize_plain(extract_dir, tok, precision, batch_size=64, device="cuda")  # warm-up
        start = time.perf_counter()
        ids = bt.tokenize_plain(extract_dir, tok, precision, batch_size=64, device="cuda")
        seconds = time.perf_counter() - start
        image = np.mean([np.mean(ids[c][0] == ref[c][0]) for c in ref])
        audio = np.mean([np.mean(ids[c][1] == ref[c][1]) for c in ref])
        print(
            f"demo tokenizers, plain loop on cuda {precision}: {len(ref) / seconds:.1f} clips/s; "
            f"ids equal to cpu fp32: image {image:.2%}, audio {audio:.2%}"
        )
        results.append(
            {
                "precision": precision,
                "clips_per_s": round(len(ref) / seconds, 2),
                "image_ids_equal_cpu_fp32": round(float(image), 5),
                "audio_ids_equal_cpu_fp32": round(float(audio), 5),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("data/.cache/bench/tokenize"))
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--test", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gpu-repeat", type=int, default=5)
    parser.add_argument("--gpu-only", action="store_true", help="skip the Ray comparison")
    parser.add_argument("--save-gpu-inputs", action="store_true")
    parser.add_argument(
        "--official-device",
        help="where the official encoders run: cuda, cpu or none (default: cuda when torch "
        "sees it, else none)",
    )
    parser.add_argument("--official-batch", type=int, default=GPU_BATCH)
    parser.add_argument(
        "--official-crop", type=int, help="cut frames and mels to this size (a smoke run)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="make WORK's clips and extract (both sets), without the clips' videos, and stop",
    )
    args = parser.parse_args()
    if args.official_crop is not None and (
        args.official_crop <= 0 or args.official_crop % 16 or args.official_crop > 256
    ):
        raise SystemExit("--official-crop must be a multiple of 16 between 16 and 256")

    if args.prepare_only:
        small = argparse.Namespace(**{**vars(args), "train": 1, "test": 1})
        for folder, how in ((args.work, args), (args.work / "small", small)):
            prepare(folder, how)
            # What a GPU machine needs: the stamp and the extract (the tokenizers are made there).
            for name in ("clips", "cache", "tokenizers"):
                shutil.rmtree(folder / name, ignore_errors=True)
        print(f"prepared {args.work}")
        return

    result: dict = {"machine": device_line(), "torch": torch.__version__}
    print(f"machine: {result['machine']}")
    inputs = args.work / "gpu_inputs.npz"
    official = args.official_device or ("cuda" if torch.cuda.is_available() else "none")
    official = None if official == "none" else official
    if not args.gpu_only:
        result["pipeline"] = bench_pipeline(args.work, args)
    if args.save_gpu_inputs or (official and not inputs.exists()):
        save_gpu_inputs(inputs, args.official_batch)
    if official:
        result["official"] = bench_gpu(
            inputs, args.gpu_repeat, official, args.official_batch, args.official_crop
        )
    else:
        print("official-encoder part skipped: torch sees no CUDA device or --official-device none")
    if torch.cuda.is_available():
        result["demo_cuda"] = bench_demo_cuda(args.work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
