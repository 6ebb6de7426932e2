"""What only a GPU can show, as one prepared command for the first GPU available (issue 14):

  python bench/gpu_check.py            # on a CUDA machine, from the repository root; exit status 1 on a FAIL

Each row prints what it measured, what is expected and PASS/FAIL (the expected figures: bench/RESULTS.md):
  (1) fp16 overflow: the notebook's train_one_epoch with a GradScaler whose scale overflows the fp16 gradients
      skips the step (weights unchanged), halves the scale, and the next steps with the usual scale train
  (2) pinned memory: make_loader pins CUDA batches; the non-blocking copies arrive equal to the host batch
  (3) device augmentation: to_model_input with augmentation on CUDA equals the CPU result
  (4) peak GPU memory of one fp16 training step at the plan's batch, 12 x 7 x 3 x 256 x 256 through
      efficientnet_v2_s, and of one evaluation batch (2 x 12): must fit a 16 GB T4/P100
  (5) bf16 step (where torch.cuda.is_bf16_supported()): finite loss, weights change
  (6) the setup's GPU check on the real GPU: the probe subprocess's facts (name, capability, arch list, bf16,
      test kernel) and judge_gpus's verdict (passes; bf16 kept from capability 8.0, else fp16 with a warning);
      the setup cells left CUDA uninitialised in this process
  (7) a fold's projected time against its measured time: a 2-epoch fold at the plan's sizes, the projection
      after epoch 1 (the notebook's project_run, issue 17 item 4) against the fold's measured wall time
  (8) the localiser section's GPU work in a child process (on_device, issue 23 item 3): a localiser forward on the
      GPU there, CUDA still uninitialised here afterwards, and the training processes' start-up check still
      passing on every GPU (checked_processes: 2 on Kaggle's T4 x2), as a second Run all would find them
  (9) the training rate at the notebook's two grids against the cost model's projection (issue 29 item 7): the
      grids are the notebook's merge_config of its CONFIG as written (img_size 'auto'), with its own conditions
      (the default five-condition run: 128 px) and with the spinal canal alone (the plan's run: 256 px); at each,
      bench/throughput.py's bare training step (a) at the plan's model and batch (40 steps after 8 warm-up), one
      line per grid: measured training samples/s on this GPU; projected samples/s on one T4 (FLOPs counted on
      the CPU, the classifier's forward x 3 per training sample, at the anchor's effective FLOP rate: the plan's
      fold in PLAN_FOLD_HOURS_T4 = 3.5 h on one T4) and on this GPU where GPU_SPEED has it (a T4 or an L4);
      measured/projected; then 128 px's speed against 256 px's (the projection scales by FLOPs, ~4x). PASS when
      both rates are measured (a figure, not a verdict: bench/RESULTS.md says what to do with it)
`--dry-run` runs the same code on the CPU at tiny sizes (CI checks that the script works; no figures): row (9)
at the notebook's grids / 4 (32 and 64 px).
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))  # bench/throughput.py: the bare training step and the projection check

from make_demo_studies import make_study_set  # noqa: E402  (needs tools/ on sys.path)
from notebook_cells import notebook_namespace  # noqa: E402
from throughput import TINY_GRID_SCALE, bare_train_rate, notebook_grids, rate_check, rate_lines  # noqa: E402

T4_BUDGET_GIB = 14.5  # a 16 GB T4 shows ~14.7 GiB to PyTorch; keep headroom for the allocator and cuDNN
PLAN = dict(img_size=256, batch_size=12, backbone="efficientnet_v2_s", gru_hidden=512, attention_hidden=256)
TINY = dict(img_size=32, batch_size=4, backbone="mobilenet_v3_small", gru_hidden=16, attention_hidden=8)
RATE_STEPS = {"cuda": (8, 40), "cpu": (1, 3)}  # row (9): warm-up and timed steps of the bare training step
rows = []


def check(name, measured, expected, ok):
    rows.append(ok)
    print(f"{name:<34} | {measured:<44} | {expected:<34} | {'PASS' if ok else 'FAIL'}")


def pieces(nb, config, samples, images, masks, device, n):
    dataset = nb["RSNADatasetV9"](samples.head(n), images, masks, config, train=True)
    loader = nb["make_loader"](dataset, config, device, train=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nb["SpineModelV9"](config).to(device)
    return model, loader, nb["CompetitionWeightedCE"](config["class_weights"]).to(device), nb["make_optimizer"](
        model, config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument("--work", default="runs/gpu_check", help="generated study set and cache")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit("No CUDA device: this check needs a GPU (or --dry-run to test the script on the CPU).")
    device = torch.device("cuda" if cuda else "cpu")
    work = Path(args.work)
    if not (work / "data" / "train.csv").exists():
        make_study_set(work / "data", n_studies=8, seed=0)
    nb = notebook_namespace({**(PLAN if cuda else TINY), "data_root": str(work / "data"), "output_dir": str(work),
                             "pretrained": "none", "num_workers": 2, "precision": "fp16"})
    config = nb["CONFIG"]
    setup_left_cuda_alone = not torch.cuda.is_initialized()  # the setup cells ran; nothing else has used CUDA
    # (8), before anything here touches CUDA: the GPU work of the localiser section runs in a child process
    child = nb["on_device"](lambda dev: (dev.type, float(nb["LevelLocaliser"](8).to(dev)(
        torch.zeros(2, 4, 64, 64, device=dev)).float().abs().sum())))
    after_child = not torch.cuda.is_initialized()
    processes = nb["checked_processes"]({**nb["CONFIG"], "processes": "auto"})
    samples, _ = nb["build_sample_table"](config)
    samples, images, masks, failures = nb["build_cache"](samples, config, workers=2)
    assert failures.empty, failures
    name = nb["machine_description"](device) if cuda else "CPU (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}, batch {config['batch_size']} x {config['num_slices']} "
          f"x 3 x {config['img_size']}^2, {config['backbone']}")
    b = config["batch_size"]

    # (1) fp16 overflow: a scale of 2**40 overflows fp16 gradients, each such step is skipped and halves it
    model, loader, criterion, optimizer = pieces(nb, config, samples, images, masks, device, b)
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**40 if cuda else 3e38)
    state = {"nonfinite": 0}
    stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, device, config, state, 1)
    same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k)
    check("(1) fp16 overflow: step skipped", f"scale {scaler.get_scale():.3g}, weights unchanged {same}",
          "scale halved once, unchanged True", same and scaler.get_scale() < (2.0**40 if cuda else 3e38))
    scaler = torch.amp.GradScaler(device.type)
    stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None, scaler, device, config, state, 2)
    moved = not torch.equal(model.state_dict()["classifier.3.weight"], before["classifier.3.weight"])
    check("(1) fp16 then trains (scale 65536)", f"loss {stats['train_loss']:.3f}, weights changed {moved}",
          "finite loss, changed True", math.isfinite(stats["train_loss"]) and moved)

    # (2) pinned memory and non-blocking copies
    batch = next(iter(loader))
    copied = batch["image"].to(device, non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
    check("(2) pinned batches, copies equal", f"pinned {batch['image'].is_pinned()}, equal "
          f"{torch.equal(copied.cpu(), batch['image'])}", "pinned True, equal True",
          (batch["image"].is_pinned() or not cuda) and torch.equal(copied.cpu(), batch["image"]))

    # (3) the device augmentation on CUDA equals the CPU's
    aug, mask = batch["aug"], batch["mask"]
    on_device = nb["to_model_input"](copied, aug.to(device), mask.to(device)).cpu()
    diff = (on_device - nb["to_model_input"](batch["image"], aug, mask)).abs().max().item()
    check("(3) augmentation CUDA vs CPU", f"max |diff| {diff:.2e}", "< 1e-3 (normalised units)", diff < 1e-3)

    # (4) peak memory of one fp16 training step and one evaluation batch at the plan's sizes
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, loader, criterion, optimizer = pieces(nb, config, samples, images, masks, device, b)
    model = model.to(memory_format=torch.channels_last)
    nb["train_one_epoch"](model, loader, criterion, optimizer, None, torch.amp.GradScaler(device.type), device,
                          config, {"nonfinite": 0}, 1)
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eval_set = nb["RSNADatasetV9"](samples.head(2 * b), images, masks, config, train=False)
    out = nb["predict"](model, nb["make_loader"](eval_set, config, device, train=False), criterion, device, config)
    eval_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    check("(4) peak GPU memory, train step", f"{train_peak:.2f} GiB", f"< {T4_BUDGET_GIB} GiB (16 GB T4/P100)",
          train_peak < T4_BUDGET_GIB)
    check("(4) peak GPU memory, eval batch", f"{eval_peak:.2f} GiB (probs {out['probs'].dtype})",
          f"< {T4_BUDGET_GIB} GiB, float32", eval_peak < T4_BUDGET_GIB and out["probs"].dtype == "float32")

    # (5) bf16 where the GPU has it (Ampere and newer)
    if not cuda or torch.cuda.is_bf16_supported():
        bf16 = {**config, "precision": "bf16"}
        model, loader, criterion, optimizer = pieces(nb, bf16, samples, images, masks, device, b)
        start = model.classifier[3].weight.detach().clone()
        stats, _ = nb["train_one_epoch"](model, loader, criterion, optimizer, None,
                                         torch.amp.GradScaler(device.type, enabled=False), device, bf16,
                                         {"nonfinite": 0}, 1)
        moved = not torch.equal(model.classifier[3].weight, start)
        check("(5) bf16 step", f"loss {stats['train_loss']:.3f}, weights changed {moved}",
              "finite loss, changed True", math.isfinite(stats["train_loss"]) and moved)
    else:
        print("(5) bf16 step: not supported on this GPU (T4/P100): skipped")
    # (6) the setup's GPU check on this GPU: the probe's facts and the verdict, bf16 asked
    facts = nb["probe_gpus"]()
    if cuda:
        gpu = facts["gpus"][0]
        judged = nb["judge_gpus"](facts, {**config, "precision": "bf16"})
        capability = ".".join(map(str, gpu["capability"]))
        print(f"    probe: {gpu['name']}, capability {capability}, bf16 {gpu['bf16']}, kernel {gpu['kernel']}, "
              f"torch {facts['torch']} (CUDA {facts['cuda']}) arch list {' '.join(facts['arch_list'])}")
        want = "bf16" if gpu["bf16"] else "fp16"
        check("(6) GPU check: kernel, verdict", f"kernel {gpu['kernel']}, {capability}: runs {judged['precision']}",
              f"OK, bf16 from 8.0 else fp16: {want}", gpu["kernel"] == "OK" and judged["precision"] == want)
    else:
        check("(6) GPU check: kernel, verdict", f"probe found {len(facts['gpus'])} GPU(s)", "0 (dry run)",
              facts["gpus"] == [] and nb["judge_gpus"](facts, config) == config)
    check("(6) setup left CUDA uninitialised", f"{setup_left_cuda_alone}", "True", setup_left_cuda_alone)

    # (7) a fold's projected time against its measured time: project_run from epoch 1's training and
    # validation seconds, as the notebook prints it, against the wall time of the whole fold (2 epochs)
    short = {**config, "epochs": 2, "warmup_epochs": 1, "swa_start_epoch": 2, "output_dir": str(work / "fold"),
             "resume": False, "time_budget_h": 0}
    folds = nb["assign_folds"](samples, short)
    start = time.time()
    result = nb["train_fold"](0, folds, images, masks, short, device)
    measured = time.time() - start
    first = result["history"][0]
    sizes = {"train": int(((folds["fold"] != 0) & (folds["fold"] >= 0)).sum()), "val": int((folds["fold"] == 0).sum())}
    projected = nb["project_run"](first["seconds"] - first["val_seconds"], first["val_seconds"], short, sizes,
                                  epochs_done=0)["whole_fold_s"]
    check("(7) projected vs measured fold", f"projected {projected:.0f} s, measured {measured:.0f} s",
          "within 25 %", abs(projected - measured) <= 0.25 * measured or not cuda)
    check("(8) section's GPU work in a child", f"ran on {child[0]}, CUDA here uninitialised {after_child}",
          f"{device.type}, True", child[0] == device.type and math.isfinite(child[1]) and after_child)
    want = max(1, torch.cuda.device_count())
    check("(8) then the training processes", f"{processes} process(es)", f"{want} (one per GPU)", processes == want)

    # (9) the training rate at the notebook's grids (the default run's and the plan's) against the projection
    warmup, steps = RATE_STEPS[device.type]
    rates = rate_check(nb, config, device, notebook_grids(nb),
                       lambda px: bare_train_rate(nb, config, device, warmup, steps, px)[0],
                       1 if cuda else TINY_GRID_SCALE)  # the dry run: the notebook's grids / 4
    print("\n".join(rate_lines(rates, device, prefix="(9) ")))
    measured = [r["measured_samples_per_s"] for r in rates]
    check("(9) training rate at each grid", ", ".join(f"{r['px']} px {r['measured_samples_per_s']:.1f}" for r in rates)
          + " samples/s", "measured at each grid (> 0)", all(math.isfinite(m) and m > 0 for m in measured))
    print(f"{sum(rows)} of {len(rows)} checks passed")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
