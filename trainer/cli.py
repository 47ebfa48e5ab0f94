"""`trainer`: check a dataset, train, evaluate, predict, export a bundle, build a TensorRT engine."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from streamd.errors import ConfigError, StreamdError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # an error line stays one line


def _friendly(fn):
    """Turn expected failures into one clear line: exit 2 for a bad config, 1 otherwise."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise  # a command's own exit status (typer's Exit is a RuntimeError): not an error to report
        except ConfigError as exc:
            console.print(f"[red]invalid config[/red]\n{exc}", highlight=False)
            raise typer.Exit(2) from None
        except (StreamdError, FileNotFoundError, ValueError, OSError, FloatingPointError, RuntimeError) as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.command("check-dataset")
@_friendly
def check_dataset_cmd(config: Path, verbose: Verbose = False) -> None:
    """Per-class counts, image sizes, background images and every problem with its file."""
    from trainer.config import load_experiment
    from trainer.datasets.check import check_dataset, print_report, report_console

    _setup_logging(verbose)
    report = check_dataset(load_experiment(config))
    print_report(report, report_console())
    if report.num_errors:
        raise typer.Exit(1)


@app.command()
@_friendly
def train(
    config: Path,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last.pth at its saved epoch.")] = False,
    stop_after_epochs: Annotated[Optional[int], typer.Option(min=1, help="End after N epochs of this call; continue later with --resume.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh in a run folder that holds an earlier run, deleting its files.")] = False,
    verbose: Verbose = False,
) -> None:
    """Train YOLOX on the experiment's dataset; writes checkpoints, metrics.csv and curves.png."""
    from trainer.config import load_experiment
    from trainer.train import TrainingInterrupted
    from trainer.train import train as run_training

    _setup_logging(verbose)
    try:
        result = run_training(load_experiment(config), resume=resume, stop_after_epochs=stop_after_epochs, overwrite=overwrite)
    except TrainingInterrupted as stop:
        again = f"trainer train {shlex.quote(str(config))}" + (" --resume" if stop.epoch else "")
        console.print(f"{stop}\n{'resume' if stop.epoch else 'start again'} with: {again}", highlight=False)
        raise typer.Exit(130) from None  # the shell's code for Ctrl-C
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same result: print it once
        typer.echo(json.dumps(asdict(result), indent=2))


@app.command("eval")
@_friendly
def eval_cmd(
    source: Annotated[Path, typer.Argument(help="A model bundle folder, or a checkpoint (.pth) / run folder.")],
    data: Annotated[Path, typer.Option("--data", help="Experiment YAML naming the dataset and classes.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: eval/<model>-<split>).")] = None,
    record: Annotated[bool, typer.Option(help="Write the metrics into the bundle's bundle.json.")] = False,
    compare: Annotated[Optional[Path], typer.Option(help="Also evaluate this model (e.g. the fp32 bundle an int8 one came from) and print the AP change.")] = None,
    verbose: Verbose = False,
) -> None:
    """VOC mAP (07 and area), mAP@0.5:0.95, COCO AP/AP50/AP75, per-class table, PR curves, JSON report.

    --compare REFERENCE evaluates REFERENCE on the same split too, prints each AP of this model, of
    REFERENCE and the change, and writes them to comparison.json in the report folder. It is explicit
    (not read from an int8 bundle's provenance) so that any two models can be compared and nothing is
    evaluated that was not asked for.
    """
    from trainer.config import load_experiment
    from trainer.datasets import load_split
    from trainer.evaluate import evaluate, load_detector, print_report

    _setup_logging(verbose)
    exp = load_experiment(data)
    if source.is_dir() and not (source / "bundle.json").is_file():
        from trainer.checkpoint import resolve_checkpoint

        source = resolve_checkpoint(source)
    detector = load_detector(source, exp)
    target = load_split(exp, split)
    for problem in target.errors:
        console.print(f"[red]error:[/red] {problem.file}: {problem.message}", highlight=False)
    if target.num_skipped:
        console.print(f"[yellow]evaluating a subset:[/yellow] {len(target)} of the {target.num_listed} images the "
                      f"{split} split names ({target.num_skipped} skipped: the errors above)", highlight=False)
    out = out or Path("eval") / f"{source.stem}-{split}"
    report = evaluate(detector, target, out_dir=out)
    print_report(report)
    typer.echo(f"report: {out / 'report.json'}  PR curves: {out / 'pr_curves.png'}")
    if compare is not None:
        from trainer.checkpoint import resolve_checkpoint
        from trainer.export.quantize import metric_changes, print_changes

        if compare.is_dir() and not (compare / "bundle.json").is_file():
            compare = resolve_checkpoint(compare)
        changes = metric_changes(report, evaluate(load_detector(compare, exp), target))
        print_changes(changes, str(source), str(compare))
        (out / "comparison.json").write_text(json.dumps({"reference": str(compare), "metrics": changes}, indent=2) + "\n")
    if record and (source / "bundle.json").is_file():
        from trainer.export.bundle import add_metrics

        add_metrics(source, {f"{split}_{k}": getattr(report, k) for k in ("voc_map50", "voc_map50_95", "coco_ap", "coco_ap50", "coco_ap75")})


@app.command()
@_friendly
def predict(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.")],
    paths: Annotated[list[Path], typer.Argument(help="Images, folders or video files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the annotated copies.")] = Path("predictions"),
    conf_threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Default: the bundle's.")] = None,
    iou_threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Default: the bundle's.")] = None,
    verbose: Verbose = False,
) -> None:
    """Run a bundle on images, folders and videos (through streamd's own stages); write annotated copies and
    detection logs in the daemon's message schema (images.jsonl, and NAME.jsonl beside each NAME.mp4)."""
    from trainer.detect import bundle_detector
    from trainer.predict import predict as run_predict

    _setup_logging(verbose)
    detector, loaded = bundle_detector(bundle)
    thresholds = loaded.meta.thresholds
    result = run_predict(
        detector, paths, out,
        conf_threshold if conf_threshold is not None else thresholds.conf_threshold,
        iou_threshold if iou_threshold is not None else thresholds.iou_threshold,
    )
    typer.echo(json.dumps(asdict(result), indent=2, default=str))
    if result.failed and not (result.num_images or result.num_videos):
        console.print(f"[red]error:[/red] every input failed ({len(result.failed)}): {result.failed[0]}", highlight=False)
        raise typer.Exit(1)


@app.command()
@_friendly
def export(
    source: Annotated[Path, typer.Argument(help="Run folder (takes best.pth) or checkpoint file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write, NAME.bundle.")],
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the experiment's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle, or write into a folder that holds files.")] = False,
    verbose: Verbose = False,
) -> None:
    """Export the ONNX model (dynamic batch, decode in graph, simplified), golden frames and bundle.json."""
    from trainer.export.bundle import export_bundle

    _setup_logging(verbose)
    result = export_bundle(source, out, name, overwrite)
    typer.echo(json.dumps(asdict(result), indent=2))


@app.command()
@_friendly
def quantize(
    bundle: Annotated[Path, typer.Argument(help="The fp32 model bundle folder.")],
    data: Annotated[Path, typer.Option("--data", help="Experiment YAML; calibrates on its train split.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write, NAME.bundle.")],
    calibration_images: Annotated[int, typer.Option(min=1, help="First N images of the train split.")] = 64,
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the source's, with -int8).")] = None,
    target: Annotated[str, typer.Option("--for", help="onnxruntime (uint8 activations, fastest on the CPU) or tensorrt (symmetric int8, zero points 0: `trainer build-engine --precision int8` builds it without --data; ONNX Runtime runs it too).")] = "onnxruntime",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle, or write into a folder that holds files.")] = False,
    verbose: Verbose = False,
) -> None:
    """int8 bundle (static Q/DQ quantization, calibrated on the train split) for ONNX Runtime or TensorRT; check it
    with `trainer eval INT8.bundle --data EXP.yaml --compare FP32.bundle`."""
    from trainer.export.quantize import quantize_bundle

    _setup_logging(verbose)
    result = quantize_bundle(bundle, data, out, calibration_images, name, target, overwrite)
    typer.echo(json.dumps(asdict(result), indent=2))


@app.command("build-engine")
@_friendly
def build_engine_cmd(
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder.")],
    precision: Annotated[str, typer.Option(help="fp32 (TF32 off), fp16 or int8.")] = "fp16",
    max_batch: Annotated[int, typer.Option(min=1, max=64)] = 8,
    calibration_data: Annotated[Optional[Path], typer.Option("--data", help="Experiment YAML; int8 calibrates on its train split (not for a bundle from `trainer quantize --for tensorrt`, which has its scales).")] = None,
    calibration_images: Annotated[int, typer.Option(min=8)] = 256,
    engine_cache_dir: Annotated[Optional[Path], typer.Option(help="The daemon's backend.engine_cache_dir (default: BUNDLE/engines).")] = None,
    device: Annotated[int, typer.Option(min=0, help="CUDA device index.")] = 0,
    verbose: Verbose = False,
) -> None:
    """Build a TensorRT engine for this GPU, cached beside the bundle (needs TensorRT 10 and CUDA)."""
    from trainer.export.engine import build_engine

    _setup_logging(verbose)
    result = build_engine(bundle, precision, max_batch, calibration_data, calibration_images, engine_cache_dir, device)
    typer.echo(json.dumps(asdict(result), indent=2, default=str))


if __name__ == "__main__":
    app()
