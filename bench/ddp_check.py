"""Several GPUs (issue 18): one prepared command for the first machine with more than one GPU.

  python bench/ddp_check.py               # from the repository root; exit status 1 on a FAIL
  python bench/ddp_check.py --share-gpu 2 # a 1-GPU machine: 2 processes on GPU 0 (gloo), no speed-up expected
  python bench/ddp_check.py --dry-run     # 2 CPU processes (gloo), tiny sizes: checks the script (CI)

The processes are forked exactly as the notebook forks them (run_in_processes: this process never initialises
CUDA), and each runs the notebook's training step (SpineModelV9 in distributed_model, AdamW, GradScaler,
autocast, gradient clipping, the global-batch loss share) on random tensors already on the device, at the
plan's global batch (12 = 12 / N per process; the loader is not part of it). Rows:
  (0) CUDA in a process forked after torch.cuda.is_available() (the notebook's setup calls it)
  (1) the start-up check (checked_processes) on all processes
  (2) samples/s on 1 process, (3) on N processes, (4) on N processes with sync_bn; the ratios (3)/(2), (4)/(2)
  (5) the replicas are equal after the timed steps (DDP kept them in step)
Expected figures: bench/RESULTS.md.
"""

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from notebook_cells import notebook_namespace  # noqa: E402  (needs tools/ on sys.path)

FORKED_CUDA = """
import os, torch
torch.cuda.is_available()
pid = os.fork()
if pid == 0:
    try:
        torch.zeros(1, device='cuda').add_(1).item()
        os._exit(0)
    except Exception as error:
        print(error)
        os._exit(1)
os._exit(os.waitpid(pid, 0)[1] >> 8)
"""
rows = []


def check(name, measured, expected, ok):
    rows.append(ok)
    print(f"{name:<40} | {measured:<52} | {expected:<30} | {'PASS' if ok else 'FAIL'}")


def training_steps(device, nb, config, warmup, steps):
    """In each process: `warmup` + `steps` training steps at batch_size / N; process 0's timing and every
    replica's parameter checksum."""
    world = nb["world_size"]()
    torch.manual_seed(config["seed"])
    model = nb["SpineModelV9"](config).to(device).to(memory_format=torch.channels_last)
    step_model, optimizer = nb["distributed_model"](model, device, config), nb["make_optimizer"](model, config)
    criterion = nb["CompetitionWeightedCE"](config["class_weights"]).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=nb["precision_in_use"](device, config) == "fp16")
    b, n, s = config["batch_size"] // world, config["num_slices"], config["img_size"]
    generator = torch.Generator(device).manual_seed(nb["process_rank"]())
    images = nb["to_model_input"](torch.randint(0, 256, (b, n, 1, s, s), generator=generator, device=device,
                                                dtype=torch.uint8))
    levels, target = torch.arange(b, device=device) % 5, torch.arange(b, device=device) % 3
    mask = torch.ones(b, n, dtype=torch.bool, device=device)

    def step():
        with nb["autocast"](device, config):
            logits, _ = step_model(images, levels, mask)
            loss = criterion(logits, target)
        scaler.scale(loss * nb["global_batch_share"](criterion, target)).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            torch.distributed.barrier()

    for _ in range(warmup):
        step()
    synchronise()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronise()
    seconds = time.perf_counter() - start
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    sums = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(sums, checksum)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"samples_per_s": steps * config["batch_size"] / seconds, "ms_per_step": 1000 * seconds / steps,
            "sums": sums if world > 1 else [checksum], "peak_gib": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="2 CPU processes (gloo), tiny sizes")
    parser.add_argument("--share-gpu", type=int, default=0, metavar="N", help="N processes on GPU 0 (gloo)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after 5 warm-up steps)")
    args = parser.parse_args(argv)
    gpus = 0 if args.dry_run else torch.cuda.device_count()  # NVML: no CUDA context in this process
    if not gpus and not args.dry_run:
        sys.exit("No GPU: this check needs one or more (or --dry-run to test the script on the CPU).")
    plan = dict(img_size=256, batch_size=12, backbone="efficientnet_v2_s", gru_hidden=512, attention_hidden=256)
    tiny = dict(img_size=32, batch_size=4, backbone="mobilenet_v3_small", gru_hidden=16, attention_hidden=8)
    nb = notebook_namespace({}, tags=("parameters", "defs"))  # not the setup cell: no CUDA work in this process
    config = nb["merge_config"](nb["CONFIG"], {**(tiny if args.dry_run else plan), "pretrained": "none",
                                               "processes": 1})
    n = args.share_gpu or (2 if args.dry_run else gpus)
    if args.share_gpu:  # every process on GPU 0, gloo (NCCL refuses two processes on one GPU)
        nb["process_device"] = lambda rank: torch.device("cuda", 0)
        nb["process_backend"] = lambda device: "gloo"
    warmup, steps = (1, 2) if args.dry_run else (5, args.steps)
    print(f"ddp_check: {n} processes on {'CPU (dry run)' if args.dry_run else f'{gpus} visible GPU(s)'}, "
          f"torch {torch.__version__}, global batch {config['batch_size']} x {config['num_slices']} x 3 x "
          f"{config['img_size']}^2, {config['backbone']}, precision {config['precision']}")

    if gpus:
        forked = subprocess.run([sys.executable, "-c", FORKED_CUDA], capture_output=True, text=True, timeout=300)
        check("(0) CUDA in a forked process", f"exit {forked.returncode} {forked.stdout.strip()[:40]}",
              "exit 0", forked.returncode == 0)
    nb["WARNINGS"].clear()
    passed = nb["checked_processes"]({**config, "processes": n}) if n > 1 else 1
    check("(1) start-up check", f"{passed} processes; warnings {len(nb['WARNINGS'])}", f"{n} processes, 0",
          passed == n and not nb["WARNINGS"])
    measured = {}
    runs = [("(2) 1 process", 1, False), (f"(3) {n} processes", n, False)]
    if gpus:  # SyncBatchNorm runs on GPUs only
        runs.append((f"(4) {n} processes, sync_bn", n, True))
    for name, processes, sync_bn in runs:
        run = functools.partial(training_steps, nb=nb, config={**config, "sync_bn": sync_bn}, warmup=warmup,
                                steps=steps)
        measured[name] = out = nb["run_in_processes"](run, processes)
        ratio = out["samples_per_s"] / measured["(2) 1 process"]["samples_per_s"]
        check(name, f"{out['samples_per_s']:.1f} samples/s, {out['ms_per_step']:.0f} ms/step, x{ratio:.2f}, "
              f"{out['peak_gib']:.1f} GiB", "x1.6-1.9 on T4 x2 (unmeasured)" if processes > 1 else "> 0",
              out["samples_per_s"] > 0)
        if processes > 1:
            check(f"(5) replicas equal after {name[4:]}", f"parameter sums {len(set(out['sums']))} distinct",
                  "1 distinct", len(set(out["sums"])) == 1)
    print(f"{sum(rows)} of {len(rows)} checks passed")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
