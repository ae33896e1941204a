"""What the defense costs, measured side by side in one run (docs/performance.md's cost table).

Four measurements, each repeated `--rounds` times with the variants alternating inside every
round (so a change in the machine's load hits all of them alike); medians and ranges:

  views   pairs per second one data worker prepares: plain pairs (eval transform + caption
          tokens), two augmented views made on the whole batch (train/views.py), and two views
          made per image with the PIL pipeline safeclip used before (kept here as the reference)
  steps   seconds per optimizer step on ready batches: plain CLIP, SafeCLIP's cross-view CLIP,
          the unimodal loss — the work each kind of phase-3 step adds over plain CLIP
  embed   `safeclip embed`'s pairs per second against the same model encoding pre-decoded
          tensors, at the same batch size and threads
  runs    whole `safeclip pretrain` runs (warm-up included) of each defense at equal epochs

    python benchmarks/cost.py --work bench-cost --source fm/train [--rounds 3] [--write-docs]

`--source` is a pair source for views, steps and embed (the benchmark's 60k captioned
Fashion-MNIST: `safeclip data fashion-mnist --out fm`); runs use the bundled 5,000-pair sample
(`--run-source` to change it). Threads: one (the default on 2 cores with one data worker).
"""

from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from sanitize.io.artifacts import Run

ROOT = Path(__file__).resolve().parents[1]
DOCS_MARK = ("<!-- cost table: benchmarks/cost.py -->", "<!-- end of cost table -->")
RUN_VARIANTS = {  # name -> pretrain options beyond the common ones
    "none": ["--defense", "none"],
    "resplit (default)": ["--defense", "resplit"],
    "safeclip (the paper's loop)": ["--defense", "safeclip"],
}


def portable(arg: str, work: Path) -> str:
    """A recorded argument without this machine's folders: WORK/..., or relative to the repository."""
    for prefix, name in ((str(work.resolve()), "WORK"), (str(work), "WORK"), (str(ROOT) + "/", "")):
        arg = arg.replace(prefix, name)
    return arg


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def pil_views_reference(image_size: int, crop_scale=(0.5, 1.0)):
    """The per-image torchvision/PIL pipeline of safeclip <= 0.1 (the comparison's baseline)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms as T

    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    transform = T.Compose([
        lambda im: im if im.mode == "RGB" else im.convert("RGB"),
        T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2), T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])

    def views(image, seed):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return [transform(image) for _ in range(2)]
    return views


def measure_views(source_path: str, pairs: int, rounds: int) -> dict:
    """Pairs per second of one worker's batches (read, decode, transform, tokenize)."""
    from sanitize.io.pairs import open_pairs
    from sanitize.models.factory import create_model
    from sanitize.train.batches import PairBatches

    _, tokenizer, size, _ = create_model("safeclip-tiny-vit")
    reference = pil_views_reference(size)

    class PilBatches(PairBatches):
        def _collate(self, items, skips):
            batch = {"key": [pair.key for _, pair in items]}
            views = [reference(pair.image, seed) for seed, pair in items]
            batch["image1"], batch["image2"] = (torch.stack([v[i] for v in views]) for i in (0, 1))
            texts = [self.eda.views(pair.caption, seed) for seed, pair in items]
            batch["text1"], batch["text2"] = (self.tokenizer([t[i] for t in texts]) for i in (0, 1))
            return batch

    def rate(data) -> float:
        start, n = time.perf_counter(), 0
        for batch in data:
            n += len(batch["key"])
            if n >= pairs:
                break
        return n / (time.perf_counter() - start)

    kinds = {
        "plain pair": lambda: PairBatches(open_pairs(source_path), tokenizer, size, 512, views=False, plain=True),
        "two views, batched": lambda: PairBatches(open_pairs(source_path), tokenizer, size, 512, views=True,
                                                  plain=False, views_here=True),
        "two views, per image (PIL, before)": lambda: PilBatches(open_pairs(source_path), tokenizer, size, 512,
                                                                 views=True, plain=False),
    }
    results = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, make in kinds.items():
            results[name].append(rate(make()))
    return {name: summary(v) for name, v in results.items()}


def measure_steps(source_path: str, steps: int, rounds: int) -> dict:
    """Seconds per optimizer step on ready batches of 512 (views made beforehand)."""
    from sanitize.io.pairs import open_pairs
    from sanitize.train.batches import PairBatches
    from sanitize.train.engine import EpochStats, Precision, Steps, run_epoch
    from sanitize.train.state import TrainState

    device = torch.device("cpu")
    state = TrainState.create("safeclip-tiny-vit", None, lr=1e-3, weight_decay=0.1, memory_bank=4096, seed=0,
                              device=device)
    data = PairBatches(open_pairs(source_path), state.tokenizer, state.image_size, 512, views=True, plain=True,
                       views_here=True)
    batch = next(iter(data))
    step_fn = Steps(state.model, device, 0.1, state.banks, zero_scale_grad=True)
    kinds = {"plain CLIP": ("clip", ("image", "text")),
             "cross-view CLIP": ("clip", ("image1", "image2", "text1", "text2")),
             "unimodal": ("unimodal", ("image1", "image2", "text1", "text2"))}
    results = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, (loss, keys) in kinds.items():
            one = {"key": batch["key"], "loss": loss, **{k: batch[k] for k in keys}}
            stats = EpochStats()
            run_epoch(state.model, [dict(one) for _ in range(steps)], state.optimizer, step_fn, lambda s: 1e-4, 0,
                      stats, precision=Precision.choose("fp32", device))
            results[name].append(stats.seconds / steps)
    out = {name: summary(v) for name, v in results.items()}
    for name in out:
        out[name]["ratio_to_plain"] = out[name]["median"] / out["plain CLIP"]["median"]
    return out


def measure_embed(source_path: str, work: Path, rounds: int) -> dict:
    """`run_embed` end to end against model-only encoding of the same pairs, pre-decoded."""
    from sanitize.io.pairs import open_pairs
    from sanitize.models.checkpoint import save_checkpoint
    from sanitize.models.factory import create_model, encode_pairs
    from sanitize.stages.config import EmbedConfig
    from sanitize.stages.embed import run_embed
    from sanitize.train.augment import eval_transform
    from sanitize.train.distributed import default_workers

    torch.manual_seed(0)
    model, tokenizer, size, config = create_model("safeclip-tiny-vit")
    checkpoint = work / "embed_model.pt"
    save_checkpoint(checkpoint, model, config)
    transform = eval_transform(size)
    pairs = list(open_pairs(source_path))
    images = torch.stack([transform(p.image) for p in pairs])
    tokens = tokenizer([p.caption for p in pairs])
    model.eval()
    results = {"model only": [], "safeclip embed": []}
    for _ in range(rounds):
        torch.set_num_threads(1)
        with torch.inference_mode():
            start = time.perf_counter()
            for i in range(0, len(pairs), 256):
                encode_pairs(model, images[i:i + 256], tokens[i:i + 256])
            results["model only"].append(len(pairs) / (time.perf_counter() - start))
        out = work / "embed_out"
        shutil.rmtree(out, ignore_errors=True)
        run = run_embed(source_path, checkpoint, out, EmbedConfig(device="cpu"))
        results["safeclip embed"].append(run.result.pairs_per_second)
    summaries = {name: summary(v) for name, v in results.items()}
    summaries["ratio"] = summaries["safeclip embed"]["median"] / summaries["model only"]["median"]
    summaries["pairs"] = len(pairs)
    summaries["workers"] = default_workers()
    return summaries


def measure_runs(source_path: str, work: Path, epochs: int, rounds: int) -> dict:
    """Whole pretrain runs: seconds from each run's own metrics (warm-up included)."""
    from typer.testing import CliRunner

    from cli.main import app

    results: dict[str, list[float]] = {name: [] for name in RUN_VARIANTS}
    commands = {}
    for r in range(rounds):
        order = list(RUN_VARIANTS.items())
        order = order[r % len(order):] + order[:r % len(order)]  # rotate who runs first
        for name, options in order:
            run = work / "runs" / re.sub(r"[^a-z0-9]+", "-", name).strip("-") / f"round{r}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["pretrain", source_path, "--out", str(run), "--preset", "cpu", "--epochs", str(epochs),
                    "--seed", "0", *options]
            commands[name] = "safeclip " + " ".join(portable(a, work) for a in args)
            result = CliRunner().invoke(app, args)
            if result.exit_code != 0:
                raise SystemExit(f"{name}: {result.output[-2000:]}")
            records = Run(run).read_metrics()
            seconds = sum(r["seconds"] if isinstance(r["seconds"], (int, float)) else r["seconds"]["total"]
                          for r in records)
            results[name].append(seconds)
    out = {name: summary(v) for name, v in results.items()}
    for name in out:
        out[name]["ratio_to_none"] = out[name]["median"] / out["none"]["median"]
        out[name]["command"] = commands[name]
    return out


def table(result: dict) -> str:
    load = result["load_average"]
    # The measurement itself keeps up to 2 processes busy; a start above that means other jobs ran too.
    busy = load["start"][0] > 1.5
    note = ("other jobs were running: the rounds alternate the variants so they share the load alike" if busy
            else "nothing else was running")
    lines = [DOCS_MARK[0], "",
             f"Measured {result['date']} with `{result['command']}` on {result['machine']}; load average "
             f"{load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end ({note}). Median (min–max) of "
             f"{result['rounds']} rounds; one torch thread.", ""]
    if "views" in result:
        v = result["views"]
        base = v["two views, per image (PIL, before)"]["median"]
        lines += ["| one data worker prepares | pairs / s | vs per-image PIL views |", "| --- | --- | --- |"]
        for name, s in v.items():
            lines.append(f"| {name} | {s['median']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f}) | {s['median'] / base:.2f}× |")
        lines.append("")
    if "steps" in result:
        lines += ["| one optimizer step, batch 512, views ready | s / step | vs plain CLIP |", "| --- | --- | --- |"]
        for name, s in result["steps"].items():
            lines.append(f"| {name} | {s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) | {s['ratio_to_plain']:.2f}× |")
        lines.append("")
    if "embed" in result:
        e = result["embed"]
        lines += [f"| {e['pairs']:,} pairs, batch 256, one thread | pairs / s |", "| --- | --- |"]
        for name in ("model only", "safeclip embed"):
            s = e[name]
            lines.append(f"| {name} | {s['median']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f}) |")
        lines += ["", f"`safeclip embed` runs at **{e['ratio']:.2f}×** the model-only throughput "
                      f"({e['workers']} data worker(s), the default here).", ""]
    if "runs" in result:
        lines += [f"| whole run, {result['run_epochs']} epochs, `--preset cpu` | seconds | vs none |",
                  "| --- | --- | --- |"]
        for name, s in result["runs"].items():
            lines.append(f"| {name} | {s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f}) | {s['ratio_to_none']:.2f}× |")
        lines += ["", "Run commands:", "", "```"] + [s["command"] for s in result["runs"].values()] + ["```", ""]
    lines.append(DOCS_MARK[1])
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "performance.md"
    doc = path.read_text()
    if DOCS_MARK[0] in doc:
        head, rest = doc.split(DOCS_MARK[0], 1)
        tail = rest.split(DOCS_MARK[1], 1)[1]
        doc = head + text + tail
    else:
        doc += "\n## What the defense costs, side by side (`benchmarks/cost.py`)\n\n" + text + "\n"
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--source", required=True, help="pair source for views, steps and embed (e.g. fm/train)")
    parser.add_argument("--run-source", default=None, help="pair source for whole runs [the bundled sample]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--view-pairs", type=int, default=10240, help="pairs per views measurement")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per steps measurement")
    parser.add_argument("--run-epochs", type=int, default=6, help="epochs of each whole run")
    parser.add_argument("--only", action="append", choices=("views", "steps", "embed", "runs"),
                        help="measure only these (repeatable)")
    parser.add_argument("--write-docs", action="store_true", help="replace the cost table in docs/performance.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sanitize.io.fashion_mnist import sample_path

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ("views", "steps", "embed", "runs"))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
              "command": "python benchmarks/cost.py " + " ".join(
                  portable(a, args.work) if a != args.source else "SOURCE" for a in sys.argv[1:]),
              "rounds": args.rounds, "run_epochs": args.run_epochs, "load_average": {"start": os.getloadavg()}}
    if "views" in only:
        result["views"] = measure_views(args.source, args.view_pairs, args.rounds)
        print(json.dumps(result["views"], indent=1), flush=True)
    if "steps" in only:
        result["steps"] = measure_steps(args.source, args.steps, args.rounds)
        print(json.dumps(result["steps"], indent=1), flush=True)
    if "embed" in only:
        result["embed"] = measure_embed(args.source, args.work, args.rounds)
        print(json.dumps(result["embed"], indent=1), flush=True)
    if "runs" in only:
        result["runs"] = measure_runs(args.run_source or str(sample_path() / "train"), args.work, args.run_epochs,
                                      args.rounds)
        print(json.dumps(result["runs"], indent=1), flush=True)
    result["load_average"]["end"] = os.getloadavg()
    (args.work / "cost.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
