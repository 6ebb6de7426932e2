"""Throughput of the le3ba_v9 notebook's training pipeline, measured with the notebook's own functions.

One run, on whatever device is present (CUDA if available, else CPU), prints a table:

  (a)  the bare training step on random tensors already on the device: SpineModelV9 + AdamW (2 groups) +
       CompetitionWeightedCE, AMP + GradScaler + channels_last on CUDA, gradient clipping; exactly the
       per-step work of the notebook's train_one_epoch without the loader
  (a') the bare inference step on random tensors (model.eval, inference_mode, autocast)
  (b)  the notebook's train_one_epoch on a cached generated study set at the same settings
  (b') the notebook's predict (the evaluation loop) on the same cache
  (c)  the ratio (b)/(a): how much of the model's speed the real loop keeps
  (d)  the cached loader alone (RSNADatasetV9 in training mode through make_loader: it copies the uint8
       crops and draws each sample's augmentation parameters), in-process and with workers: samples/s in
       total and per worker, and the workers' CPU time per sample (steady on a shared machine, where the
       wall rate per worker depends on the share of a core each one gets)
  (f)  the training augmentation's pixel work on the device: to_model_input with a batch's augmentation
       parameters and mask (warp, gamma/contrast/brightness, noise, normalisation), part of (b)
  (e)  the cache build (build_cache from the DICOM files of a generated study set, --rle of its series
       RLE Lossless) with each worker count: slices (crops written) per second

Loop rates (b, b', d) are steady-state: from the arrival of the first batch to the end. The time to the
first batch (worker start and prefetch, paid once per epoch since the loader's workers are not
persistent) is printed beside them and added to the estimate of an RSNA-sized fold's epoch.

Below the table, (a) again at each of --grids (issue 29 item 7; default on CUDA: the notebook's grids, its
merge_config resolving img_size 'auto' for CONFIG as written, 128 px for the default five-condition run, and
with the spinal canal alone, 256 px for the plan's run; the grid equal to --img-size reuses (a)'s figure), one
line per grid: measured training samples/s on this device beside the samples/s the notebook's cost model implies
(projected = the classifier's forward FLOPs at that grid counted on the CPU, x 3 per training sample, at the
effective FLOP rate of one T4 that its anchor gives: training_projection's t4_rate, the plan's fold in
PLAN_FOLD_HOURS_T4 = 3.5 h), on one T4 and, for a T4 or an L4, on this GPU (GPU_SPEED), and measured/projected;
then how the smaller grid's speed scales against the larger's (the projection scales by FLOPs alone, ~4x from
256 to 128 px). bench/RESULTS.md ("On a GPU"; "Row (9)" under gpu_check) says what to do with the figures.

Usage (from the repository root):
  python bench/throughput.py                 # plan settings on CUDA (+ (a) at 128 and 256 px); a scaled-down set on CPU
  python bench/throughput.py --tiny          # CI: finishes in well under a minute on 2 CPU cores ((a) at 32, 64 px)
  python bench/throughput.py --img-size 256 --json runs/bench/cpu256.json
  python bench/throughput.py --grids 128 256 # the CPU preset with (a) at the notebook's grids as well
The generated study set is kept under --work (default runs/bench) and reused by later runs.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_studies import make_study_set  # noqa: E402  (needs tools/ on sys.path)
from notebook_cells import notebook_namespace  # noqa: E402

RSNA_TRAIN, RSNA_VAL = 7900, 2000  # samples of one fold of the competition data (spinal canal, 5 folds)
CPUS = os.cpu_count() or 1

# Settings per mode; each is overridable on the command line. CUDA: the plan's model and sizes.
PRESETS = {
    "cuda": dict(backbone="efficientnet_v2_s", img_size=256, batch_size=12, num_slices=7, precision="fp16",
                 gru_hidden=512, attention_hidden=256, studies=64, train_steps=60, bare_steps=40, warmup=8,
                 eval_batches=30, loader_batches=150, loader_workers=f"0,{CPUS}", cache_workers=f"1,{CPUS}"),
    "cpu": dict(backbone="mobilenet_v3_small", img_size=128, batch_size=8, num_slices=7, precision="fp16",
                gru_hidden=512, attention_hidden=256, studies=16, train_steps=30, bare_steps=20, warmup=3,
                eval_batches=10, loader_batches=100, loader_workers=f"0,{CPUS}", cache_workers=f"1,{CPUS}"),
    "tiny": dict(backbone="mobilenet_v3_small", img_size=64, batch_size=4, num_slices=7, precision="fp16",
                 gru_hidden=64, attention_hidden=32, studies=3, train_steps=4, bare_steps=3, warmup=1,
                 eval_batches=2, loader_batches=8, loader_workers="0,1", cache_workers=f"{min(2, CPUS)}",
                 threads=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="CI size: tiny study set, few steps, small model")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--work", help="folder for the generated study set (reused) and run files "
                                  "(default runs/bench; --tiny: a temporary folder)")
    p.add_argument("--json", help="also write every figure and setting to this JSON file")
    p.add_argument("--backbone", choices=["efficientnet_v2_s", "mobilenet_v3_small"])
    p.add_argument("--pretrained", default="none", help="CONFIG['pretrained'] (speed does not depend on it)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--grids", type=int, nargs="*", metavar="PX",
                   help="grids at which (a) is also measured and printed beside the cost model's projected "
                        "samples/s (default: on CUDA the notebook's grids, merge_config of its CONFIG with and "
                        "without the spinal canal alone, 128 and 256; --tiny: those / 4; CPU preset: none; "
                        "--grids alone: none)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--slices", type=int, dest="num_slices")
    p.add_argument("--precision", choices=["fp16", "bf16"], help="CUDA autocast dtype (CPU runs float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only, as the notebook)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--gru-hidden", type=int)
    p.add_argument("--attention-hidden", type=int)
    p.add_argument("--studies", type=int, help="studies in the generated set")
    p.add_argument("--rle", type=float, default=0.5, help="fraction of RLE Lossless series in the generated set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, help="steps of (b) (the cached rows are repeated as needed)")
    p.add_argument("--bare-steps", type=int, help="timed steps of (a)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps before (a), (a'), (b), (b')")
    p.add_argument("--eval-batches", type=int, help="batches of (b') (eval batch = 2 x batch size)")
    p.add_argument("--loader-batches", type=int, help="batches per loader measurement (d)")
    p.add_argument("--loader-workers", help="comma-separated num_workers values for (d); 0 = in-process")
    p.add_argument("--cache-workers", help="comma-separated worker counts for (e); the last one's cache is used")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in the main process (default: torch's "
                                               "own choice, as in the notebook; --tiny: 1, robust on a busy machine)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.mode = "tiny" if args.tiny else args.device
    args.threads = args.threads or PRESETS[args.mode].get("threads") or torch.get_num_threads()
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.loader_workers = [int(w) for w in str(args.loader_workers).split(",")]
    args.cache_workers = [int(w) for w in str(args.cache_workers).split(",")]
    return args


def quiet():
    """The notebook's own prints go to stderr so that stdout holds only the table."""
    return contextlib.redirect_stdout(sys.stderr)


def timed(step, warmup, steps, device):
    """Seconds taken by `steps` calls of step after `warmup` untimed ones, device work included."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedLoader:
    """A DataLoader passed through unchanged, recording when each batch arrives."""

    def __init__(self, loader):
        self.loader, self.dataset, self.arrivals = loader, loader.dataset, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.arrivals.append(time.perf_counter())
            yield batch


def repeated(samples, n):
    """The first n rows of the cached samples repeated as often as needed (a longer epoch, same cache)."""
    reps = math.ceil(n / len(samples))
    return pd.concat([samples] * reps, ignore_index=True).head(n)


def study_set(args, work):
    """A generated competition-layout study set under `work`, reused when already complete."""
    root = work / f"studies{args.studies}_seed{args.seed}_rle{args.rle:g}"
    if not (root / "GENERATED_BY.txt").exists():
        start = time.perf_counter()
        make_study_set(root, n_studies=args.studies, seed=args.seed, rle_fraction=args.rle)
        print(f"generated {root} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return root


def peak_memory(device):
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def new_model(nb, config, device):
    """The model, criterion, optimizer and scaler exactly as the notebook's train_fold sets them up."""
    model = nb["SpineModelV9"](config).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if config["compile"] and device.type == "cuda" else model
    criterion = nb["CompetitionWeightedCE"](config["class_weights"]).to(device)
    optimizer = nb["make_optimizer"](model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config["precision"] == "fp16")
    return model, step_model, criterion, optimizer, scaler


def bare_batch(config, device, px=None):
    """A random training batch already on the device at config's batch and slices, px x px (default img_size):
    uint8 images as the loader ships them, levels, labels and a full slice mask."""
    b, n, s = config["batch_size"], config["num_slices"], px or config["img_size"]
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (b, n, 3, s, s), dtype=torch.uint8, device=device, generator=g)
    levels = torch.randint(0, 5, (b,), device=device, generator=g)
    labels = torch.randint(0, 3, (b,), device=device, generator=g)
    return images, levels, labels, torch.ones(b, n, dtype=torch.bool, device=device)


def bare_train_rate(nb, config, device, warmup, steps, px=None):
    """(a) training steps on a random batch already on the device (bare_batch at px, default img_size): the
    per-step work of train_one_epoch without the loader (to_model_input, autocast, loss.item(), scaler,
    clipping) on a new model set up as train_fold sets it up. Returns (figures, step_model, batch)."""
    reset_memory(device)
    model, step_model, criterion, optimizer, scaler = new_model(nb, config, device)
    batch = images, levels, labels, mask = bare_batch(config, device, px)

    def train_step():
        x = nb["to_model_input"](images, noise_std=config["aug_noise"])
        with nb["autocast"](device, config):
            logits, _ = step_model(x, levels, mask)
            loss = criterion(logits, labels)
        loss.item()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step_model.train()
    seconds = timed(train_step, warmup, steps, device)
    b = config["batch_size"]
    train = {"samples_per_s": steps * b / seconds, "ms_per_step": 1000 * seconds / steps, "steps": steps,
             "warmup": warmup, "batch": b, "px": images.shape[-1], "peak_gib": peak_memory(device)}
    return train, step_model, batch


def bench_bare(nb, config, device, args):
    """(a) training steps and (a') inference steps on random uint8 batches already on the device: the
    per-step work of train_one_epoch / predict (to_model_input, autocast, loss.item(), scaler, clipping)."""
    train, step_model, (images, levels, _, mask) = bare_train_rate(nb, config, device, args.warmup, args.bare_steps)
    b = config["batch_size"]

    reset_memory(device)
    eval_images = images.repeat(2, 1, 1, 1, 1)  # the evaluation loader's batch is twice the training batch
    eval_levels, eval_mask = levels.repeat(2), mask.repeat(2, 1)

    @torch.inference_mode()
    def infer_step():
        x = nb["to_model_input"](eval_images)
        with nb["autocast"](device, config):
            out, _ = step_model(x, eval_levels, eval_mask)
        return out.float().cpu()  # predict keeps its outputs; one copy to the host stands in for that

    step_model.eval()
    seconds = timed(infer_step, args.warmup, args.bare_steps, device)
    infer = {"samples_per_s": args.bare_steps * 2 * b / seconds, "ms_per_step": 1000 * seconds / args.bare_steps,
             "steps": args.bare_steps, "warmup": args.warmup, "batch": 2 * b, "peak_gib": peak_memory(device)}
    return train, infer


def bench_augment(nb, config, device, args):
    """(f) to_model_input on a training batch (1-channel uint8 at the cached side, as the loader ships it) with
    its augmentation parameters and mask, on the device: warped and cropped to img_size."""
    b, n, s = config["batch_size"], config["num_slices"], nb["crop_side"](config)
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randint(0, 256, (b, n, 1, s, s), dtype=torch.uint8, device=device, generator=g)
    rng = np.random.default_rng(0)
    aug = torch.from_numpy(np.stack([nb["draw_augmentation"](rng, config) for _ in range(b)])).to(device)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    steps = max(args.bare_steps, 10)
    seconds = timed(lambda: nb["to_model_input"](images, aug, mask, config["aug_noise"], config["img_size"]),
                    args.warmup, steps, device)
    return {"samples_per_s": steps * b / seconds, "ms_per_step": 1000 * seconds / steps, "steps": steps,
            "batch": b}


def bench_loop(nb, samples, images, masks, config, device, args):
    """(b) train_one_epoch and (b') predict, the notebook's own loops, on the cache."""
    reset_memory(device)
    model, step_model, criterion, optimizer, scaler = new_model(nb, config, device)
    b = config["batch_size"]
    state = {"nonfinite": 0}

    def loader(rows, train):
        dataset = nb["RSNADatasetV9"](rows, images, masks, config, train=train)
        dataset.set_epoch(1)
        generator = torch.Generator().manual_seed(0) if train else None
        return TimedLoader(nb["make_loader"](dataset, config, device, train=train, generator=generator))

    with quiet():  # warm-up: a few steps through the same code (first-call costs, compilation)
        nb["train_one_epoch"](step_model, loader(repeated(samples, args.warmup * b), True), criterion, optimizer,
                              None, scaler, device, config, state, 0)
    sync(device)
    timed = loader(repeated(samples, args.train_steps * b), True)
    start = time.perf_counter()
    with quiet():
        stats, _ = nb["train_one_epoch"](step_model, timed, criterion, optimizer, None, scaler, device, config,
                                         state, 1)
    sync(device)
    end = time.perf_counter()
    steps = len(timed.arrivals)
    train = {"samples_per_s": steps * b / (end - timed.arrivals[0]),
             "ms_per_step": 1000 * (end - timed.arrivals[0]) / steps,
             "first_batch_s": timed.arrivals[0] - start, "epoch_samples_per_s": steps * b / (end - start),
             "steps": steps, "batch": b, "workers": nb["worker_count"](config), "train_loss": stats["train_loss"],
             "peak_gib": peak_memory(device)}

    reset_memory(device)
    with quiet():
        nb["predict"](step_model, loader(repeated(samples, 2 * b), False), criterion, device, config)
    timed = loader(repeated(samples, args.eval_batches * 2 * b), False)
    sync(device)
    start = time.perf_counter()
    with quiet():
        out = nb["predict"](step_model, timed, criterion, device, config)
    sync(device)
    end = time.perf_counter()
    n = len(out["labels"])
    infer = {"samples_per_s": n / (end - timed.arrivals[0]),
             "ms_per_step": 1000 * (end - timed.arrivals[0]) / len(timed.arrivals),
             "first_batch_s": timed.arrivals[0] - start, "epoch_samples_per_s": n / (end - start),
             "steps": len(timed.arrivals), "batch": 2 * b, "workers": nb["worker_count"](config),
             "peak_gib": peak_memory(device)}
    return train, infer


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_loader(nb, samples, images, masks, config, device, args, workers):
    """(d) the training loader alone: RSNADatasetV9 in training mode (uint8 crops + augmentation parameters;
    the pixels are augmented on the device, (f)) through make_loader. Besides the wall
    rate, the CPU time the workers (or, in-process, the main process) spent per sample: on a busy machine
    the wall rate per worker falls with the share of a core a worker gets, the CPU cost per sample does not."""
    config = {**config, "num_workers": workers}
    b = config["batch_size"]
    dataset = nb["RSNADatasetV9"](repeated(samples, args.loader_batches * b), images, masks, config, train=True)
    dataset.set_epoch(1)
    loader = nb["make_loader"](dataset, config, device, train=True, generator=torch.Generator().manual_seed(0))
    arrivals, worker_cpu = [], None
    start, cpu_start = time.perf_counter(), time.process_time()
    iterator = iter(loader)
    for k in range(len(loader)):
        batch = next(iterator)
        assert batch["image"].dtype == torch.uint8
        arrivals.append(time.perf_counter())
        if k == len(loader) - 1 and workers:  # every sample is made; the workers are not shut down yet
            worker_cpu = [cpu_seconds(w.pid) for w in iterator._workers]
    main_cpu = time.process_time() - cpu_start
    del iterator
    samples_made = len(arrivals) * b
    cpu = main_cpu if not workers else (sum(worker_cpu) if None not in worker_cpu else float("nan"))
    steady = (len(arrivals) - 1) * b / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    return {"samples_per_s": steady, "per_worker": steady / max(workers, 1), "workers": workers,
            "cpu_ms_per_sample": 1000 * cpu / samples_made, "per_core_samples_per_s": samples_made / cpu,
            "main_cpu_ms_per_sample": 1000 * main_cpu / samples_made,
            "first_batch_s": arrivals[0] - start, "epoch_samples_per_s": samples_made / (arrivals[-1] - start),
            "batches": len(arrivals), "batch": b}


def bench_cache(nb, samples, config, workers, cache_dir):
    """(e) build_cache from the DICOM files into a fresh cache folder."""
    config = {**config, "cache_dir": str(cache_dir)}
    cv2_threads = cv2.getNumThreads()
    start = time.perf_counter()
    with quiet():
        kept, images, masks, failures = nb["build_cache"](samples, config, workers)
    seconds = time.perf_counter() - start
    cv2.setNumThreads(cv2_threads)  # built in-process (workers <= 1), preprocess_series set it to 1 here
    slices = int(masks.sum())
    result = {"slices_per_s": slices / seconds, "per_worker": slices / seconds / max(workers, 1), "workers": workers,
              "seconds": seconds, "slices": slices, "samples": len(kept), "series": int(samples["series_id"].nunique()),
              "failures": len(failures)}
    return result, (kept, images, masks)


GPU_NAMES = {r"\bT4\b": "one T4", r"\bL4\b": "L4"}  # device name (torch.cuda.get_device_name) -> GPU_SPEED key
TINY_GRID_SCALE = 4  # --tiny (and gpu_check --dry-run) measure the notebook's grids / 4 (32 and 64 px)


def notebook_grids(nb):
    """[(px, label)]: the crop grids the notebook's merge_config gives its CONFIG as written (the parameters cell,
    img_size 'auto'), first with its own conditions (the default run), then with the spinal canal alone (the
    plan's run); one entry when both give the same grid."""
    written = notebook_namespace({}, tags=("parameters",))["CONFIG"]
    with quiet():  # merge_config's notes and warnings
        runs = [nb["merge_config"](written, {}), nb["merge_config"](written, {"conditions": [nb["SPINAL"]]})]
    grids = {}
    for config, label in zip(runs, (f"the default run: {len(runs[0]['conditions'])} conditions",
                                    "the plan's run: spinal canal alone")):
        grids[config["img_size"]] = f"{grids[config['img_size']]}; {label}" if config["img_size"] in grids else label
    return list(grids.items())


def gpu_speed_key(name, speeds):
    """The key of `speeds` (the notebook's GPU_SPEED) for a GPU named `name` ('Tesla T4' -> 'one T4', 'NVIDIA L4'
    -> 'L4'; an L40S is no L4), else None: a GPU the cost model has no factor for."""
    return next((key for pattern, key in GPU_NAMES.items() if re.search(pattern, name) and key in speeds), None)


def gpu_speed_entry(nb, device):
    """The GPU_SPEED key of this device, by its name; None on a CPU."""
    return gpu_speed_key(torch.cuda.get_device_name(device), nb["GPU_SPEED"]) if device.type == "cuda" else None


def projected_rate(nb, config, px):
    """Training samples/s the notebook's cost model implies at a grid of px, per GPU_SPEED entry: its effective
    FLOP rate of one T4 (training_projection's t4_rate: the plan's fold in PLAN_FOLD_HOURS_T4) / (3 x the
    classifier's forward FLOPs per sample at px: classifier_flops with config's model and num_slices, counted on
    the CPU), times each GPU's factor over one T4."""
    with quiet():
        t4_rate = nb["training_projection"](config, nb["real_data_rows"](config))["t4_rate"]
    per_sample = 3 * nb["classifier_flops"](config, px, config["num_slices"])
    return {"t4_rate": t4_rate, "anchor_hours": nb["PLAN_FOLD_HOURS_T4"], "train_flops_per_sample": per_sample,
            "samples_per_s": {gpu: speed * t4_rate / per_sample for gpu, (speed, _) in nb["GPU_SPEED"].items()}}


def rate_check(nb, config, device, grids, measure, scale=1):
    """Measured against projected training samples/s at each grid: `grids` [(px, label)] (notebook_grids),
    measured at px // scale (a dry run's tiny stand-ins) by `measure(px)` -> a bare_train figures dict. One dict
    per grid, for rate_lines and the JSON."""
    entry = gpu_speed_entry(nb, device)
    out = []
    for px, label in grids:
        run = px // scale
        measured = measure(run)
        projected = projected_rate(nb, config, run)
        against = entry or "one T4"
        out.append({"px": run, "stands_for_px": px, "label": label, "measured": measured,
                    "measured_samples_per_s": measured["samples_per_s"], **projected, "this_gpu": entry,
                    "against": against,
                    "ratio": measured["samples_per_s"] / projected["samples_per_s"][against]})
    return out


def rate_lines(results, device, prefix=""):
    """The printed comparison: a header naming both sides, a line per grid, and, for two grids, how the smaller
    grid's speed scales against the larger's (the projection scales by FLOPs)."""
    first = results[0]
    where = (f"this GPU, {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"this {CPUS}-core CPU (figures meaningless against a GPU)")
    header = (f"{prefix}training rate vs the cost model's projection, batch {first['measured']['batch']} "
              f"(measured = the bare training step (a) on {where}; projected = FLOPs counted on the CPU, the "
              f"classifier's forward x 3 per training sample, at the anchor's rate: the plan's fold in its "
              f"{first['anchor_hours']} h on one T4 = {first['t4_rate'] / 1e12:.4f} TFLOP/s effective)")
    lines = [header]
    for r in results:
        stands = "" if r["px"] == r["stands_for_px"] else f", standing for {r['stands_for_px']} px"
        here = (f"{fmt(r['samples_per_s'][r['this_gpu']])} samples/s on this GPU ({r['this_gpu']})" if r["this_gpu"]
                else "no GPU_SPEED factor for this device")
        lines.append(f"{prefix}training rate at {r['px']} px ({r['label']}{stands}) | measured "
                     f"{fmt(r['measured_samples_per_s'])} samples/s | projected {fmt(r['samples_per_s']['one T4'])} "
                     f"samples/s on one T4 | {here} | measured/projected {r['ratio']:.4g} (vs {r['against']}) | "
                     f"{r['train_flops_per_sample'] / 1e9:.4f} GFLOP per training sample")
    if len(results) == 2:
        small, large = sorted(results, key=lambda r: r["px"])
        quality = small["ratio"] / large["ratio"]
        lines.append(
            f"{prefix}grid scaling {small['px']} px vs {large['px']} px: measured "
            f"{small['measured_samples_per_s'] / large['measured_samples_per_s']:.2f}x the samples/s, projected "
            f"{large['train_flops_per_sample'] / small['train_flops_per_sample']:.2f}x (the FLOPs ratio); "
            f"{small['px']} px keeps {quality:.3f} of the speed its FLOPs give against {large['px']} px: with the "
            f"hours anchored at {large['px']} px, those projected at {small['px']} px x {1 / quality:.2f}")
    return lines


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}" if abs(value) >= 10 else f"{value:.3f}"


def device_words(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{CPUS}-core CPU, no GPU"


def table(rows):
    header = ("row", "measurement", "value", "unit", "ms/step", "workers", "per worker", "note")
    cells = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) + " | " + r[-1] for r in cells)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    temporary = None
    if args.work:
        work = Path(args.work)
    elif args.tiny:
        temporary = tempfile.TemporaryDirectory(prefix="le3ba_bench_")
        work = Path(temporary.name)
    else:
        work = REPO / "runs" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=work))  # this run's output and caches, removed at the end
    started = time.time()
    try:
        root = study_set(args, work)
        overrides = {"data_root": str(root), "output_dir": str(run_dir / "out"), "cache_dir": str(run_dir / "cache"),
                     "backbone": args.backbone, "pretrained": args.pretrained, "img_size": args.img_size,
                     "batch_size": args.batch_size, "num_slices": args.num_slices, "precision": args.precision,
                     "compile": args.compile, "channels_last": args.channels_last, "gru_hidden": args.gru_hidden,
                     "attention_hidden": args.attention_hidden, "seed": args.seed}
        with quiet():
            nb = notebook_namespace(overrides)
            config = nb["CONFIG"]
            samples, _ = nb["build_sample_table"](config)

        # (e) first: the process pool forks before anything touches CUDA
        caches = []
        for workers in args.cache_workers:
            result, cached = bench_cache(nb, samples, config, workers, run_dir / f"cache_w{workers}")
            caches.append(result)
        kept, images, masks = cached
        loaders = [bench_loader(nb, kept, images, masks, config, device, args, w) for w in args.loader_workers]
        config = {**config, "num_workers": max(args.loader_workers)}  # (b) runs with the most loader workers
        bare_train, bare_infer = bench_bare(nb, config, device, args)
        named = dict(notebook_grids(nb))
        if args.grids is None:  # the notebook's grids (a tiny run's: / 4), none on the CPU preset
            grids, scale = (list(named.items()), TINY_GRID_SCALE if args.tiny else 1) if args.mode != "cpu" else ([], 1)
        else:
            grids, scale = [(px, named.get(px, "--grids")) for px in args.grids], 1
        rates = rate_check(nb, config, device, grids, lambda px: bare_train if px == args.img_size else bare_train_rate(
            nb, config, device, args.warmup, args.bare_steps, px)[0], scale) if grids else []
        augment = bench_augment(nb, config, device, args)
        loop_train, loop_infer = bench_loop(nb, kept, images, masks, config, device, args)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if temporary is not None:
            temporary.cleanup()
    ratio = loop_train["samples_per_s"] / bare_train["samples_per_s"]
    estimate = {"train_s": RSNA_TRAIN / loop_train["samples_per_s"] + loop_train["first_batch_s"],
                "val_s": RSNA_VAL / loop_infer["samples_per_s"] + loop_infer["first_batch_s"]}
    estimate["epoch_s"] = estimate["train_s"] + estimate["val_s"]

    precision = (f"autocast {args.precision}" + (" + GradScaler" if args.precision == "fp16" else "")
                 if device.type == "cuda" else "float32 (the notebook uses AMP on CUDA only)")
    settings = {"mode": args.mode, "device": str(device), "device_words": device_words(device),
                "torch": torch.__version__, "cpu_count": CPUS, "torch_threads": torch.get_num_threads(),
                "backbone": args.backbone, "pretrained": args.pretrained, "batch_size": args.batch_size,
                "num_slices": args.num_slices, "img_size": args.img_size, "precision": precision,
                "channels_last": args.channels_last, "compile": args.compile and device.type == "cuda",
                "gru_hidden": args.gru_hidden, "attention_hidden": args.attention_hidden,
                "studies": args.studies, "rle_fraction": args.rle, "cached_samples": len(kept),
                "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
                "command": " ".join([Path(sys.argv[0]).name if argv is None else "throughput.py",
                                     *(sys.argv[1:] if argv is None else argv)])}

    b = args.batch_size
    rows = [
        ("(a)", "bare train step, random tensors on device", fmt(bare_train["samples_per_s"]), "samples/s",
         fmt(bare_train["ms_per_step"]), "-", "-",
         f"batch {b}; {args.bare_steps} steps after {args.warmup} warm-up"),
        ("(a')", "bare inference step, random tensors", fmt(bare_infer["samples_per_s"]), "samples/s",
         fmt(bare_infer["ms_per_step"]), "-", "-", f"batch {2 * b}; {args.bare_steps} steps"),
        ("(b)", "train_one_epoch on the cache (steady)", fmt(loop_train["samples_per_s"]), "samples/s",
         fmt(loop_train["ms_per_step"]), loop_train["workers"], "-",
         (f"{loop_train['steps']} steps; first batch after {loop_train['first_batch_s']:.2f} s; "
          f"with it {fmt(loop_train['epoch_samples_per_s'])} samples/s")),
        ("(b')", "predict (eval loop) on the cache (steady)", fmt(loop_infer["samples_per_s"]), "samples/s",
         fmt(loop_infer["ms_per_step"]), loop_infer["workers"], "-",
         f"batch {2 * b}; {loop_infer['steps']} batches; first batch after {loop_infer['first_batch_s']:.2f} s"),
        ("(c)", "ratio (b)/(a)", f"{ratio:.3f}", "-", "-", "-", "-",
         "share of the bare model's speed the real training loop keeps"),
        ("(f)", "augmentation on the device (to_model_input)", fmt(augment["samples_per_s"]), "samples/s",
         fmt(augment["ms_per_step"]), "-", "-",
         f"batch {b}; {augment['steps']} calls; warp + intensity + noise + normalisation; inside (b)"),
    ]
    for r in loaders:
        rows.append(("(d)", f"loader alone (train mode), num_workers={r['workers']}", fmt(r["samples_per_s"]),
                     "samples/s", "-", r["workers"] or "0 (in-process)", fmt(r["per_worker"]),
                     (f"CPU {r['cpu_ms_per_sample']:.2f} ms/sample in the {'workers' if r['workers'] else 'process'}"
                      f" = {fmt(r['per_core_samples_per_s'])} samples/s per busy core"
                      + (f", main process {r['main_cpu_ms_per_sample']:.2f} ms/sample" if r["workers"] else "")
                      + f"; {r['batches']} batches of {r['batch']}; first batch after {r['first_batch_s']:.2f} s")))
    for r in caches:
        rows.append(("(e)", f"cache build (build_cache), workers={r['workers']}", fmt(r["slices_per_s"]),
                     "slices/s", "-", r["workers"] if r["workers"] > 1 else f"{r['workers']} (in-process)",
                     fmt(r["per_worker"]),
                     f"{r['slices']} slices ({r['samples']} samples, {r['series']} series) in {r['seconds']:.1f} s"))

    lines = [
        (f"le3ba_v9 throughput | {settings['date_utc']} UTC | device {device} = {settings['device_words']} | "
         f"torch {torch.__version__} | {CPUS} CPUs, {settings['torch_threads']} torch threads"),
        (f"settings ({args.mode} preset + overrides): backbone {args.backbone} (pretrained {args.pretrained}), "
         f"batch {b}, {args.num_slices} slices, img {args.img_size}, {precision}, channels_last {args.channels_last}, "
         f"compile {settings['compile']}, GRU {args.gru_hidden}, attention {args.attention_hidden}; data: "
         f"{args.studies} generated studies (RLE fraction {args.rle:g}), {len(kept)} samples cached"),
        "",
        table(rows),
        "",
    ]
    if device.type == "cuda":
        lines.append("peak GPU memory (torch.cuda.max_memory_allocated): " + ", ".join(
            f"{name} {fmt(r['peak_gib'])} GiB" for name, r in
            (("(a)", bare_train), ("(a')", bare_infer), ("(b)", loop_train), ("(b')", loop_infer))))
    used = next(r for r in loaders if r["workers"] == loop_train["workers"])
    lines.append(f"loader headroom: (d) with num_workers={used['workers']} (as in (b)) / (a) = "
                 f"{used['samples_per_s'] / bare_train['samples_per_s']:.2f} (below 1: the loader limits training)")
    lines.append(
        f"estimated epoch of an RSNA-sized fold ({RSNA_TRAIN} train + {RSNA_VAL} val samples) at these settings: "
        f"{RSNA_TRAIN} / (b) {fmt(loop_train['samples_per_s'])} + first batch {loop_train['first_batch_s']:.1f} s "
        f"+ {RSNA_VAL} / (b') {fmt(loop_infer['samples_per_s'])} + first batch {loop_infer['first_batch_s']:.1f} s "
        f"= {estimate['train_s']:.0f} + {estimate['val_s']:.0f} = {estimate['epoch_s']:.0f} s "
        "(checkpoint writing not included)")
    if rates:
        lines += [""] + rate_lines(rates, device)
    print("\n".join(lines))
    if args.json:
        figures = {"settings": settings, "a_bare_train": bare_train, "a_bare_inference": bare_infer,
                   "b_train_one_epoch": loop_train, "b_predict": loop_infer, "c_ratio": ratio, "d_loader": loaders,
                   "e_cache_build": caches, "f_device_augmentation": augment, "rsna_fold_epoch_estimate": estimate,
                   "a_grids": rates}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
