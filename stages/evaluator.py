"""DVC stage `evaluator`: the offline evaluator (audio + image classifiers, contrastive heads)
trained on the extracted train split and checked on the test split."""

import csv
import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.devices import resolve_device
from pipeline.evaluation.figures import evaluator_figure
from pipeline.evaluation.train_local import held_out_metrics, load_clips, train_local_evaluator
from pipeline.stage import stage_main
from pipeline.tokenizers.tokenizer import load_tokenizers


def main() -> str:
    params = load_params()
    cfg = params.evaluator
    extract, out = Path(params.paths.extract), Path(params.paths.evaluator)
    report = Path(params.paths.reports) / "evaluator"
    with tracking.stage_run("evaluator", params.base.experiment, as_dict(cfg), report) as run:
        device = resolve_device(cfg.device)
        toks = load_tokenizers(params.paths.tokenizers, device) if cfg.codec_augment else None
        train = load_clips(extract, "train", cfg.per_label)
        model, history, timings = train_local_evaluator(train, cfg, params.base.seed, device, toks)
        test = load_clips(extract, "test")
        metrics, confusion = held_out_metrics(model, test, toks)
        metrics |= {"train_clips": len(train), "test_clips": len(test)}
        metrics |= {k: round(v, 1) for k, v in timings.items()}
        model.save(out, {"metrics": metrics, "comparable_to_paper": False,
                         "git_commit": tracking.git_commit()})  # fmt: skip
        io.write_json(report / "metrics.json", {"comparable_to_paper": False, **metrics})
        with io.atomic_path(report / "history.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["part", "epoch", "loss", "acc"])
            writer.writeheader()
            writer.writerows(history.rows)
        evaluator_figure(history.rows, confusion, model.labels, report / "evaluator.png")
        run.log_metrics(metrics)
        run.log_artifact(report / "evaluator.png")
    return (
        f"evaluator: {len(model.labels)} labels, {len(train)} train clips; on {len(test)} test "
        f"clips audio accuracy {metrics['audio_acc']:.1%}, image {metrics['image_acc']:.1%}, "
        f"CS matched {metrics['cs_matched']:.1f} vs shuffled {metrics['cs_shuffled']:.1f} -> {out}"
    )


if __name__ == "__main__":
    sys.exit(stage_main("evaluator", main))
