"""The `tokenizers` stage's work: import or train each VQGAN, evaluate it, set up the vocoder.

Per modality, `pretrained` names an official checkpoint to import (verified strictly against the
architecture) or, when empty, a VQGAN is trained on the train split of the extracted data. Both
are evaluated on the test split and saved as tokenizer folders; the vocoder folder records the
MelGAN weights or that Griffin-Lim is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import cards, checkpoint, io
from pipeline.config import TokenizersConfig
from pipeline.data import extracted
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.tokenizers.layout import MODALITIES
from pipeline.tokenizers.tokenizer import InputSpec
from pipeline.tokenizers.train import evaluate_tokenizer, import_pretrained, train_tokenizer
from pipeline.tokenizers.vocoder import build_vocoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizersSummary:
    sources: dict[str, str]
    metrics: dict[str, float]
    vocoder: str
    seconds: float
    pictures: list[Path] = field(default_factory=list)

    def describe(self, out_dir: Path) -> str:
        parts = []
        for m in MODALITIES:
            key = "image_psnr" if m == "image" else "audio_mel_l1"
            value = self.metrics.get(key)
            shown = f"{key.split('_', 1)[1]} {value:.3g}" if value is not None else ""
            parts.append(
                f"{m} {self.sources[m]} ({shown}, usage {self.metrics.get(f'{m}_codebook_usage', 0):.0%})"
            )
        return (
            f"tokenizers: {'; '.join(parts)}; vocoder {self.vocoder}; "
            f"{self.seconds:.0f} s -> {out_dir}"
        )


def input_specs(extract_dir: Path) -> dict[str, InputSpec]:
    """What each tokenizer eats, read from the extract stage's meta.json (not from params)."""
    meta = extracted.load_meta(extract_dir)
    size = int(meta["image_size"])
    n_mels, frames = meta["mel"]["shape"]
    return {
        "image": InputSpec("image", (3, size, size)),
        "audio": InputSpec("mel", (1, n_mels, frames)),
    }


def run_tokenizers(
    cfg: TokenizersConfig,
    extract_dir: Path,
    out_dir: Path,
    report_dir: Path,
    *,
    seed: int,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> TokenizersSummary:
    """Import or train both tokenizers into `out_dir/{image,audio}`, the vocoder into
    `out_dir/vocoder` (for the mel settings `extract_dir`'s meta.json records)."""
    start = time.monotonic()
    if not (extract_dir / io.META_NAME).is_file():
        raise PipelineError(f"{extract_dir} has no meta.json: run the extract stage first")
    specs = input_specs(extract_dir)
    device = resolve_device(cfg.device)
    sources, metrics, pictures = {}, {}, []
    for modality in MODALITIES:
        mcfg = getattr(cfg, modality)
        report = report_dir / modality
        report.mkdir(parents=True, exist_ok=True)
        if mcfg.pretrained:
            log.info("%s tokenizer: importing %s", modality, mcfg.pretrained)
            tok = import_pretrained(modality, mcfg, specs[modality], device=device)
            sources[modality] = "imported"
        else:
            log.info("%s tokenizer: training on %s (%s)", modality, extract_dir, device)
            prefixed = None
            if log_metrics is not None:

                def prefixed(m: dict[str, float], step: int, _p: str = modality) -> None:
                    log_metrics({f"{_p}_{k}": v for k, v in m.items()}, step)

            tok = train_tokenizer(
                modality,
                mcfg,
                specs[modality],
                extract_dir,
                device=device,
                seed=seed,
                report_dir=report,
                log_metrics=prefixed,
            ).tokenizer
            sources[modality] = "trained"
        scores = evaluate_tokenizer(
            tok, extract_dir, split="test", max_examples=mcfg.train.eval_examples, report_dir=report
        )
        metrics.update({f"{modality}_{k}": float(v) for k, v in scores.items()})
        tok.save(out_dir / modality, extra={"test_metrics": scores})
        checkpoint.write_card(out_dir / modality, cards.tokenizer_card(tok.meta))
        pictures += sorted(report.glob("*.png"))
    vocoder = build_vocoder(cfg.vocoder, extracted.settings(extracted.load_meta(extract_dir)))
    vocoder.save(out_dir / "vocoder", extra={"source": cfg.vocoder.melgan or "griffin_lim"})
    return TokenizersSummary(sources, metrics, vocoder.kind, time.monotonic() - start, pictures)
