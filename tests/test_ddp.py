"""Issue 18: a fold on several processes (DistributedDataParallel), forked from the notebook, on CPU processes
with the gloo backend: the same code path as one process per GPU with NCCL."""

import copy
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(nb, tmp_path_factory):
    """Samples (4 folds; fold 0 with an odd number of samples) and a 32-px crop cache."""
    config = {**nb["CONFIG"], "img_size": 32, "cache_dir": str(tmp_path_factory.mktemp("cache")), "num_folds": 4}
    samples, _ = nb["build_sample_table"](config)
    samples, images, masks, failures = nb["build_cache"](nb["assign_folds"](samples, config), config, workers=1)
    assert failures.empty
    fold0 = samples.index[samples["fold"] == 0]
    if len(fold0) % 2 == 0:  # an odd validation fold: the processes' shards differ in length
        samples = samples.drop(fold0[-1])
    return samples, images, masks


@pytest.fixture(autouse=True)
def one_thread():
    """Each CPU process runs one thread (run_in_processes shares the cores), and so does this one: on 2 busy
    cores, 2 threads spinning for each other make a tiny model's steps ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(nb, out, **changes):
    """One tiny fold, 2 epochs with SWA in the second. Nothing random differs between 1 and 2 processes:
    no dropout and no noise (both draw from the process's generator in batch-sized shapes); the geometric
    augmentation stays on (a function of seed, epoch and sample: the same in any process)."""
    return {**nb["CONFIG"], "output_dir": str(out), "img_size": 32, "epochs": 2, "batch_size": 4, "num_folds": 4,
            "warmup_epochs": 1, "swa_start_epoch": 2, "gru_hidden": 16, "attention_hidden": 8, "learning_rate": 1e-3,
            "backbone_lr": 1e-3, "swa_lr": 5e-4, "patience": 10, "dropout": 0.0, "gru_dropout": 0.0,
            "aug_noise": 0.0, "sync_bn": True, "num_workers": 0, **changes}


@pytest.fixture
def groupnorm_backbone(nb, monkeypatch):
    """The backbone with GroupNorm (per sample) in place of BatchNorm. BatchNorm normalises over the batch a
    process sees, and SyncBatchNorm, which would make 2 processes' batches one, runs on GPUs only (torch raises
    'SyncBatchNorm expected input tensor to be on GPU' on the CPU); with per-process BatchNorm, 2 processes
    at batch 2 each are a different computation from 1 at batch 4. Everything else is the notebook's."""
    build = nb["build_backbone"]

    def build_without_batchnorm(config):
        features, channels = build(config)
        for parent in list(features.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, name, torch.nn.GroupNorm(1, child.num_features))
        return features, channels

    monkeypatch.setitem(nb, "build_backbone", build_without_batchnorm)


def new_children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_two_processes_train_the_same_fold_as_one(nb, cached, tmp_path, groupnorm_backbone):
    runs, warned = {}, {}
    for n in (1, 2):
        nb["WARNINGS"].clear()
        runs[n] = nb["run_fold"](0, *cached, tiny(nb, tmp_path / f"p{n}"), CPU, n)
        warned[n] = list(nb["WARNINGS"])
    one, two = runs[1], runs[2]
    # every validation row exactly once, in order: 13 rows, split 8 + 5 over the processes
    assert len(one["val_rows"]) == 13
    assert (two["val_rows"].index == one["val_rows"].index).all()
    # the same model kinds (best exists only where an epoch passed the save gate, which depends on the torch build)
    assert one["evaluations"].keys() == two["evaluations"].keys() >= {"last", "swa"}
    for kind in one["evaluations"]:
        a, b = one["evaluations"][kind], two["evaluations"][kind]
        assert a["probs"].shape == b["probs"].shape == (13, 3)
        np.testing.assert_array_equal(b["labels"], one["val_rows"]["label"].to_numpy())
        assert sum(b["pred_counts"]) == 13
        # float32 sums in another order (gradients averaged over 2 half batches, losses normalised by an
        # all-reduced weight sum, convolutions over 2 samples instead of 4) differ in the last bits, which two Adam
        # epochs amplify: measured max |difference| 1e-7 with torch 2.14.1, 4.3e-4 with torch 2.10.0 (its CPU
        # kernels round a batch of 2 otherwise than one of 4). Without the global batch share of the loss
        # (global_batch_share returning 1) the probabilities differ by 0.22: the bound is 100 times below that.
        np.testing.assert_allclose(b["probs"], a["probs"], atol=2e-3, rtol=0)
        np.testing.assert_allclose(b["attention"], a["attention"], atol=2e-3, rtol=0)
        assert b["ba"] == a["ba"] and b["pred_counts"] == a["pred_counts"]
    for name in ["last.pt", "swa.pt"] + ["best.pt"] * ("best" in one["evaluations"]):
        a = torch.load(tmp_path / "p1/fold0" / name, weights_only=False)["model"]
        b = torch.load(tmp_path / "p2/fold0" / name, weights_only=False)["model"]
        assert a.keys() == b.keys()  # model.module's state_dict: checkpoints are interchangeable
        for key in a:
            # the attention scorer's last bias shifts every slice's score alike, which the softmax over slices
            # cancels: its gradient is rounding noise (~1e-10) that Adam scales up to +-lr per step in either
            # run, so it drifts (2e-4 here) without changing any output; every other weight is within 1e-5 with
            # torch 2.14.1, 2e-3 with torch 2.10.0 (the rounding above)
            if key != "attention.attention.2.bias":
                torch.testing.assert_close(b[key], a[key], atol=5e-3, rtol=0, msg=key)
    assert [r["epoch"] for r in two["history"]] == [1, 2]
    for a, b in zip(one["history"], two["history"]):
        assert (a["val_ba"], a["saved"], a["train_ba"]) == (b["val_ba"], b["saved"], b["train_ba"])
        assert b["grad_norm_mean"] == pytest.approx(a["grad_norm_mean"], rel=1e-3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)  # the global batch's, not process 0's
    steps = (cached[0]["fold"] > 0).sum() // 4
    assert len(two["lr_steps"]) == len(one["lr_steps"]) == 2 * steps  # the same steps at the same LRs
    np.testing.assert_allclose(two["lr_steps"], one["lr_steps"], rtol=1e-12)
    assert warned[2] == warned[1]  # process 0's warnings reach the notebook's report


def test_swa_batchnorm_over_two_processes_equals_one(nb, cached, tmp_path):
    config = tiny(nb, tmp_path)
    samples, images, masks = cached
    rows = samples[samples["fold"] != 0].head(48)  # 6 evaluation batches of 8, 3 per process
    dataset = nb["RSNADatasetV9"](rows, images, masks, config, train=False)
    torch.manual_seed(0)
    swa = torch.optim.swa_utils.AveragedModel(nb["SpineModelV9"](config))

    def recompute(device):
        loader = nb["make_loader"](dataset, config, device, False, sampler=nb["evaluation_shard"](dataset, config))
        assert len(loader) == 3
        nb["recompute_swa_batchnorm"](swa, loader, device)
        return swa.module.backbone.state_dict()

    two = nb["run_in_processes"](recompute, 2)
    one = copy.deepcopy(swa)
    nb["recompute_swa_batchnorm"](one, nb["make_loader"](dataset, config, CPU, False), CPU)
    expected = one.module.backbone.state_dict()
    statistics = [k for k in expected if "running" in k or "num_batches" in k]
    assert len(statistics) > 30 and int(two["0.1.num_batches_tracked"]) == 6
    for key in statistics:
        torch.testing.assert_close(two[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)


def crash_in_process_1(nb, action):
    def on_epoch_end(epoch):
        if nb["process_rank"]() == 1:
            action()
    return on_epoch_end


def raise_error():
    raise ValueError("injected failure in process 1")


@pytest.mark.parametrize("action, message", [
    (raise_error, r"process 1 failed first:\n.*ValueError: injected failure in process 1"),
    (lambda: os.kill(os.getpid(), signal.SIGKILL), r"process 1 terminated with signal SIGKILL"),
])
def test_a_failure_in_one_process_stops_all_with_its_error(nb, cached, tmp_path, action, message):
    before = new_children()
    with pytest.raises(RuntimeError, match=re.compile(message, re.S)):
        nb["run_fold"](0, *cached, tiny(nb, tmp_path), CPU, 2, on_epoch_end=crash_in_process_1(nb, action))
    assert new_children() - before == set()  # no process left behind
    assert not (tmp_path / "fold0/swa.pt").exists()  # the fold did not finish anywhere


def test_a_hang_in_one_process_ends_at_the_collective_timeout(nb, cached, tmp_path):
    before, start = new_children(), time.time()
    with pytest.raises(RuntimeError, match=re.compile(r"process 0 failed first:.*(?i:time)", re.S)):
        nb["run_fold"](0, *cached, tiny(nb, tmp_path), CPU, 2, timeout=datetime.timedelta(seconds=5),
                       on_epoch_end=crash_in_process_1(nb, lambda: time.sleep(600)))
    assert time.time() - start < 60
    assert new_children() - before == set()


def test_interrupting_the_notebook_ends_every_process(nb, cached, tmp_path):
    """The kernel's interrupt (KeyboardInterrupt while it waits for the processes) kills them all."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def sleep(epoch):
        time.sleep(600)

    before, previous = new_children(), signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(8)
    try:
        with pytest.raises(KeyboardInterrupt):
            nb["run_fold"](0, *cached, tiny(nb, tmp_path), CPU, 2, on_epoch_end=sleep)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert new_children() - before == set()


def test_startup_check_passes_on_two_cpu_processes_and_falls_back_to_one_loudly(nb, monkeypatch, capsys, tmp_path):
    config = tiny(nb, tmp_path, processes=2)
    assert nb["checked_processes"](config) == 2
    said = ("training on 2 processes (DistributedDataParallel, gloo, global batch 4 = 2 per process): "
            "process 0: CPU, process 1: CPU")
    assert said in capsys.readouterr().out

    def failing_step(device, config):
        if nb["process_rank"]() == 1:
            raise RuntimeError("NCCL error: unhandled system error")
        torch.distributed.barrier()

    monkeypatch.setitem(nb, "startup_step", failing_step)
    nb["WARNINGS"].clear()
    assert nb["checked_processes"](config) == 1
    assert len(nb["WARNINGS"]) == 1 and "trains on ONE process" in nb["WARNINGS"][0]
    assert "process 1 failed first" in nb["WARNINGS"][0] and "NCCL error: unhandled system error" in nb["WARNINGS"][0]


@pytest.mark.parametrize("changes, error", [
    ({"processes": 0}, "'auto' .* or a whole number >= 1"),
    ({"processes": "two"}, "'auto' .* or a whole number >= 1"),
    ({"processes": True}, "'auto' .* or a whole number >= 1"),
    ({"processes": 2, "batch_size": 13}, "batch_size'\\] = 13 does not split evenly over 2 processes"),
    ({"sync_bn": "yes"}, "sync_bn'\\] = 'yes'"),
])
def test_bad_process_settings_stop_at_setup(nb, changes, error):
    with pytest.raises(ValueError, match=error):
        nb["merge_config"]({**nb["CONFIG"], "demo": False}, changes)


def test_processes_auto_is_one_without_a_gpu_and_not_part_of_a_resume_check(nb):
    assert nb["planned_processes"]({"processes": "auto"}) == max(1, torch.cuda.device_count())
    assert nb["planned_processes"]({"processes": 3}) == 3
    assert "processes" not in nb["comparable"](nb["CONFIG"])  # a 2-process checkpoint resumes on 1 and back
    assert "sync_bn" in nb["comparable"](nb["CONFIG"])


def test_ddp_check_dry_run_prints_every_row(tmp_path):
    """bench/ddp_check.py --dry-run: the multi-GPU check's own code on 2 CPU processes (figures meaningless)."""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(repo / "bench" / "ddp_check.py"), "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in run.stdout.splitlines()
            if re.match(r"^\(\d\)", line)}
    assert set(rows) == {"(1) start-up check", "(2) 1 process", "(3) 2 processes",
                         "(5) replicas equal after 2 processes"}, run.stdout
    assert all(cells[-1] == "PASS" for cells in rows.values())
    rates = [float(rows[k][1].split()[0]) for k in ("(2) 1 process", "(3) 2 processes")]
    assert all(r > 0 for r in rates)
    assert "4 of 4 checks passed" in run.stdout


def draw():
    return torch.rand(3), np.random.rand(3), random.random()


def same(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def streams_per_process(nb, cached, config, device):
    """In each process: draws after fold_pieces, after an epoch-3 checkpoint, and after resuming it from the list of
    every process's streams, from an older checkpoint's single dict and from a list one process saved."""
    f = nb["fold_pieces"](0, *cached, config, device)
    out = {"start": draw()}
    f.state["epoch"] = 3
    nb["save_fold_checkpoint"](f, config)
    out["after_save"] = draw()
    torch.distributed.barrier()
    original = torch.load(f.last_path, weights_only=False)
    out["saved"] = len(original["rng"])
    for kind, rng in (("list", original["rng"]), ("dict", original["rng"][0]), ("one", original["rng"][:1])):
        torch.distributed.barrier()  # every process has read the file before process 0 rewrites it
        if nb["is_main_process"]():
            nb["save_atomic"]({**original, "rng": rng}, f.last_path)
        torch.distributed.barrier()
        nb["resume_fold"](f, config, device)
        out[kind] = draw()
    return nb["gathered"](out)


def test_each_process_draws_its_own_stream_and_resumes_it(nb, cached, tmp_path):
    """Issue 23 item 7c: process 1 draws other dropout masks and noise than process 0 (whose draws are one
    process's); a checkpoint holds both processes' streams and a resume gives each its own; an older checkpoint's
    single dict goes to every process; a process the checkpoint has no stream for starts from process_seed."""
    config = tiny(nb, tmp_path / "two")
    two = nb["run_in_processes"](lambda device: streams_per_process(nb, cached, config, device), 2)
    nb["fold_pieces"](0, *cached, tiny(nb, tmp_path / "one"), CPU)
    assert same(draw(), two[0]["start"])  # process 0 draws as a single process does
    assert not torch.equal(two[0]["start"][0], two[1]["start"][0])
    assert two[0]["saved"] == two[1]["saved"] == 2
    for rank in (0, 1):
        assert same(two[rank]["list"], two[rank]["after_save"]), rank
        assert same(two[rank]["dict"], two[0]["after_save"]), rank
    assert same(two[0]["one"], two[0]["after_save"])
    nb["seed_everything"](nb["process_seed"](config, 0, 1, 3))
    assert same(two[1]["one"], draw()) and not same(two[1]["one"], two[0]["one"])
