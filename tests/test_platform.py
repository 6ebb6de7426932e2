"""Issue 17 items 2 and 5: the GPU check at setup (probe facts stubbed: the CPU machine plays P100, T4, L4, a
broken GPU and no GPU), the real probe subprocess, CUDA left uninitialised in the kernel, and the shared-memory,
disk and checkpoint-save checks with shutil.disk_usage and torch.save stubbed."""

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

# torch 2.10.0's cu128 wheel from PyPI (torch._C._cuda_getArchFlags()): no sm_60 kernels (Kaggle/docker-python#1546)
CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
Usage = namedtuple("Usage", "total used free")


def facts(name, capability, kernel="OK", arch_list=CU128, triton=True):
    return {"torch": "2.10.0+cu128", "cuda": "12.8", "arch_list": arch_list, "triton": triton,
            "gpus": [{"index": 0, "name": name, "capability": list(capability), "bf16": tuple(capability) >= (8, 0),
                      "kernel": kernel, "memory_gib": 16.0}]}


def test_p100_stops_the_run_naming_the_gpu_its_capability_the_kernels_and_what_to_pick(nb):
    with pytest.raises(RuntimeError) as error:
        nb["judge_gpus"](facts("Tesla P100-PCIE-16GB", (6, 0)), nb["CONFIG"])
    message = str(error.value)
    assert "Tesla P100-PCIE-16GB" in message and "compute capability 6.0" in message
    assert "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in message and "2.10.0+cu128" in message
    assert '"GPU T4 x2" or "GPU L4"' in message


@pytest.mark.parametrize("arch, capability, runs", [
    ("sm_75", (7, 5), True), ("sm_80", (8, 6), True), ("sm_80", (8, 9), True), ("sm_86", (8, 0), False),
    ("sm_90", (10, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (9, 1), False), ("sm_60", (6, 1), True),
    ("compute_90", (12, 0), True), ("compute_90", (8, 9), False), ("sm_100f", (10, 3), True),
    ("sm_120", (12, 0), True), ("sm_75", (6, 0), False)])
def test_arch_rule_binaries_within_a_major_ptx_upwards(nb, arch, capability, runs):
    assert nb["arch_runs_on"](arch, capability) is runs


def test_ptx_alone_lets_a_newer_gpu_run(nb):
    newer = facts("Future GPU", (13, 0), arch_list=["sm_90", "compute_90"])
    assert nb["judge_gpus"](newer, nb["CONFIG"])["precision"] == nb["CONFIG"]["precision"]
    with pytest.raises(RuntimeError, match="compute capability 13.0"):
        nb["judge_gpus"](facts("Future GPU", (13, 0), arch_list=["sm_90"]), nb["CONFIG"])


def test_t4_with_bf16_asked_runs_fp16_with_a_warning(nb, capsys):
    config = {**nb["CONFIG"], "precision": "bf16"}
    judged = nb["judge_gpus"](facts("Tesla T4", (7, 5)), config)
    assert judged["precision"] == "fp16" and config["precision"] == "bf16"  # a new dict, the input untouched
    out = capsys.readouterr().out
    assert out.startswith("WARNING: precision 'bf16' needs compute capability 8.0") and "Tesla T4 has 7.5" in out
    assert nb["WARNINGS"][-1].startswith("precision 'bf16'")  # repeated in the report


def test_l4_keeps_bf16_and_compile_silently(nb, capsys):
    config = {**nb["CONFIG"], "precision": "bf16", "compile": True}
    assert nb["judge_gpus"](facts("NVIDIA L4", (8, 9)), config) == config
    assert capsys.readouterr().out == ""


def test_compile_without_triton_is_turned_off_loudly(nb, capsys):
    config = {**nb["CONFIG"], "compile": True}
    assert nb["judge_gpus"](facts("NVIDIA L4", (8, 9), triton=False), config)["compile"] is False
    assert "triton is not installed: the model runs uncompiled" in capsys.readouterr().out


def test_a_failing_test_kernel_stops_the_run_with_its_error(nb):
    broken = facts("NVIDIA L4", (8, 9), kernel="AcceleratorError: CUDA error: no kernel image is available")
    with pytest.raises(RuntimeError) as error:
        nb["judge_gpus"](broken, nb["CONFIG"])
    assert "NVIDIA L4" in str(error.value) and "no kernel image is available" in str(error.value)


def test_no_gpu_is_the_cpu_path(nb):
    assert nb["judge_gpus"](nb["NO_GPU"], nb["CONFIG"]) == nb["CONFIG"]
    assert nb["pick_device"](nb["NO_GPU"]) == torch.device("cpu")
    assert nb["pick_device"](facts("NVIDIA L4", (8, 9))) == torch.device("cuda")
    assert nb["machine_description"](torch.device("cuda"), facts("NVIDIA L4", (8, 9))).startswith(
        "NVIDIA L4 (compute capability 8.9); ")


def test_the_real_probe_runs_in_a_subprocess_and_setup_leaves_cuda_uninitialised(nb):
    probed = nb["probe_gpus"]()
    assert probed["gpus"] == [] and probed["torch"] == torch.__version__  # this machine has no GPU
    assert nb["GPU_FACTS"]["gpus"] == [] and nb["DEVICE"] == torch.device("cpu")
    assert not torch.cuda.is_initialized()


def test_setup_on_a_gpu_machine_asks_cuda_nothing_in_the_kernel(study_set, tmp_path, monkeypatch):
    """The setup cells on a (stubbed) L4 machine: the probe's subprocess is the only source of GPU facts; any
    CUDA query or initialisation in this process raises."""
    import json
    import subprocess

    from notebook_cells import notebook_namespace

    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA used in the kernel")
    for name in ("_lazy_init", "get_device_name", "get_device_capability", "get_device_properties", "set_device",
                 "get_arch_list", "mem_get_info", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    l4 = json.dumps(facts("NVIDIA L4", (8, 9)))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, l4 + "\n", ""))
    ns = notebook_namespace({"data_root": str(study_set), "output_dir": str(tmp_path), "precision": "bf16",
                             "num_workers": 0})
    assert ns["DEVICE"] == torch.device("cuda") and ns["CONFIG"]["precision"] == "bf16"
    assert ns["GPU_FACTS"]["gpus"][0]["name"] == "NVIDIA L4"
    assert not torch.cuda.is_initialized()


# --- item 5: shared memory, disk, failing saves ---

def test_loader_shm_bytes_counts_one_channel_at_the_real_sample_shapes(nb):
    config = {**nb["CONFIG"], "img_size": 256, "batch_size": 12, "num_slices": 7, "prefetch_factor": 4}
    side = nb["crop_side"](config)
    assert side == 372
    train = 12 * (7 * 372**2 + 256)
    val = 24 * (7 * 256**2 + 256)
    assert nb["loader_shm_bytes"](config, 4, 4) == 16 * (train + val)  # 4 workers x prefetch 4: ~362 MiB


def test_shared_memory_too_small_lowers_prefetch_then_workers_with_a_warning(nb, capsys):
    config = {**nb["CONFIG"], "img_size": 256, "batch_size": 12, "prefetch_factor": 4}
    per_batch_pair = nb["loader_shm_bytes"](config, 1, 1)  # one training + one validation batch
    assert nb["fit_shared_memory"](config, 4, 64 * per_batch_pair) == (4, 4)  # room: unchanged, silent
    assert capsys.readouterr().out == ""
    assert nb["fit_shared_memory"](config, 4, 8 * per_batch_pair) == (4, 1)
    assert "using 4 workers x prefetch 1" in capsys.readouterr().out
    docker_default = 64 * 2**20  # Docker's 64 MB /dev/shm: room for one batch pair (~22 MiB) in its half
    assert nb["fit_shared_memory"](config, 4, docker_default) == (1, 1)
    out = capsys.readouterr().out
    assert "/dev/shm has 64 MiB free" in out and "using 1 workers x prefetch 1 (22 MiB)" in out and "--shm-size" in out
    assert nb["fit_shared_memory"](config, 4, 16 * 2**20) == (0, 1)  # not even one pair: batches made in-process


def test_check_resources_reaches_make_loader(nb, monkeypatch, tmp_path):
    config = {**nb["CONFIG"], "img_size": 256, "batch_size": 12, "num_workers": 4, "prefetch_factor": 4,
              "output_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache")}
    pair = nb["loader_shm_bytes"](config, 1, 1)

    def usage(path):
        return Usage(10**13, 0, 3 * pair if str(path) == "/dev/shm" else 10**12)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    fitted = nb["check_resources"](config, 100)
    assert (fitted["num_workers"], fitted["prefetch_factor"]) == (1, 1)
    dataset = torch.utils.data.TensorDataset(torch.zeros(4))
    loader = nb["make_loader"](dataset, fitted, torch.device("cpu"), train=False)
    assert loader.num_workers == 1 and loader.prefetch_factor == 1


def test_disk_needs_the_cache_and_each_folds_checkpoints(nb, tmp_path):
    config = {**nb["CONFIG"], "img_size": 64, "num_slices": 7, "train_folds": [0, 1],
              "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    needs = nb["disk_needs"](config, 1000, 10 * 2**20)
    assert needs == {str(tmp_path / "cache"): 1000 * 7 * 94**2, str(tmp_path / "out"): (2 * 7 + 4) * 10 * 2**20}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "images.u8").write_bytes(b"\0" * 1000)  # what the cache holds is reused
    assert nb["disk_needs"](config, 1000, 10 * 2**20)[str(tmp_path / "cache")] == 1000 * 7 * 94**2 - 1000


def test_weights_bytes_matches_the_models_own_count(nb):
    config = {**nb["CONFIG"], "backbone": "mobilenet_v3_small", "gru_hidden": 32}
    model = nb["SpineModelV9"](config)
    exact = 4 * sum(p.numel() for p in model.parameters())
    assert exact <= nb["weights_bytes"](config) <= exact + 8 * 2**20
    plan = {**nb["CONFIG"], "backbone": "efficientnet_v2_s", "gru_hidden": 512, "gru_layers": 2}
    assert 110 * 2**20 < nb["weights_bytes"](plan) < 140 * 2**20  # ~30 M parameters


def test_too_little_disk_stops_before_any_work_naming_path_need_and_free(nb, monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 3 * 2**30))
    needs = {str(tmp_path / "cache"): 2 * 2**30, str(tmp_path / "out"): 1 * 2**30}  # one disk: 3 GiB + 10 %
    with pytest.raises(OSError) as error:
        nb["check_disk"](needs)
    message = str(error.value)
    assert "3.00 GiB" in message and f"{tmp_path / 'cache'} (2.00 GiB)" in message and "3.00 GiB is free" in message
    nb["check_disk"]({str(tmp_path / "out"): 2 * 2**30})  # 2.2 GiB needed, 3 free: passes


def test_kaggle_output_cap_counts_for_kaggle_working(nb, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, 10**12))
    monkeypatch.setitem(nb, "runtime_environment", lambda: "kaggle")
    monkeypatch.setitem(nb, "folder_bytes", lambda folder: 5 * 10**9)
    assert nb["disk_free"]("/kaggle/working/le3ba_v9") == 15 * 10**9
    assert nb["disk_free"]("/kaggle/temp/cache") == 10**12
    with pytest.raises(OSError, match="Kaggle keeps at most 20 GB"):
        nb["check_disk"]({"/kaggle/working/le3ba_v9": 16 * 10**9})


@pytest.mark.parametrize("failure, cause", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11109248 vs 11109140"),
     "no space left on its disk"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on its disk"),
    (PermissionError(errno.EACCES, "Permission denied"), "PermissionError: [Errno 13] Permission denied")])
def test_a_failed_save_removes_its_partial_file_and_names_the_cause(nb, monkeypatch, tmp_path, failure, cause):
    (tmp_path / "last.pt").write_bytes(b"previous")

    def failing_save(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise failure
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 2**20))
    with pytest.raises(OSError) as error:
        nb["save_atomic"]({"w": 1}, tmp_path / "last.pt")
    message = str(error.value)
    assert message.startswith(f"Could not save {tmp_path / 'last.pt'}: {cause}") and "0.00 GiB free" in message
    assert not (tmp_path / "last.tmp").exists() and (tmp_path / "last.pt").read_bytes() == b"previous"
    assert error.value.__cause__ is failure


def test_a_save_that_works_replaces_the_file(nb, tmp_path):
    nb["save_atomic"]({"w": torch.ones(2)}, tmp_path / "last.pt")
    assert torch.equal(torch.load(tmp_path / "last.pt")["w"], torch.ones(2))
    assert not (tmp_path / "last.tmp").exists()
