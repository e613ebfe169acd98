"""Data-parallel training under torchrun (two gloo ranks on the CPU).

The equivalence tests compare weight *updates*: ‖w_two − w_one‖ / ‖w_one − w_start‖, where
`one` is one process and `two` is two ranks, both with the config's batch 2b per step (b per
rank). A one-process run with batch b (half the data) is the control: it must land far away, so
the comparison can fail.
Every run uses one thread (OMP_NUM_THREADS=1): CPU kernels' results depend on the thread count.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from torch import nn

from stages.runtime.distributed import ProcessGroupBatchNorm, Ranks, convert_batchnorm
from stages.runtime.errors import DudaError
from tests.conftest import TINY_CONFIG, make_index

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Stated tolerances (relative to the update of the one-process run).
EXACT = 1e-4  # terms normalised alike in both layouts: measured about 1e-6
# The adversarial warmup, measured 5e-5: Adam divides each gradient element by its running
# magnitude, so rounding-level differences in near-zero discriminator gradients become
# lr-sized steps that reach the student through the adversarial term.
ADVERSARIAL = 1e-3
PER_RANK = 0.3  # the default self-training step: measured about 0.1 (see the test)


# ---------------------------------------------------------------------------- fast unit tests


def test_process_group_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    synced = ProcessGroupBatchNorm(3)
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 5, 6)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


def test_convert_batchnorm_keeps_parameters_and_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    weight, bias = model[1].weight, model[1].bias
    convert_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], ProcessGroupBatchNorm)
    assert isinstance(model[2][0], ProcessGroupBatchNorm)
    assert model[1].weight is weight and model[1].bias is bias  # an optimizer still holds them
    assert not model[1].weight.requires_grad
    assert torch.all(model[1].running_mean == 0.5)


def test_resume_refuses_another_number_of_processes() -> None:
    ranks = Ranks(torch.device("cpu"))
    ranks.check_resume({"world_size": 1}, "RUN")
    with pytest.raises(DudaError) as error:
        ranks.check_resume({"world_size": 2}, "RUN")
    assert "trained by 2 process(es), this launch has 1" in error.value.message
    assert "torchrun --nproc_per_node 2" in error.value.fix


# ------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    index = make_index(root / "index")
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["dropout"] = 0.0  # each rank draws its own dropout masks
    config["self_train"]["iterations"] = 6
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return {"root": root, "index": index, "config": config_file}


@pytest.fixture(scope="module")
def trained(setup) -> dict[str, Path]:
    """A warmup checkpoint and its pseudo-label store, for self-training."""
    root, common = setup["root"], ["-c", str(setup["config"]), "--data", str(setup["index"])]
    duda("warmup", *common, "--out", str(root / "warmup"))
    duda("generate-pseudo", *common, "--checkpoint", str(root / "warmup"),
         "--out", str(root / "pseudo"))
    return {**setup, "warmup": root / "warmup", "pseudo": root / "pseudo"}


def duda(*args: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = ([sys.executable] if ranks == 1
                else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(ranks)])
    process = subprocess.run([*launcher, "-m", "duda_cli", *args, "--device", "cpu"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert process.returncode == 0, process.stderr[-3000:]
    return process


def weights(run: Path, key: str = "student") -> torch.Tensor:
    state = torch.load(run / "model.pt", weights_only=True)[key]
    return torch.cat([v.float().flatten() for k, v in state.items()
                      if v.is_floating_point() and "running" not in k])


def relative_gaps(start: torch.Tensor, one: Path, two: Path, half: Path | None = None,
                  ) -> tuple[float, float | None]:
    """(‖two − one‖, ‖half − one‖) over ‖one − start‖."""
    update = (weights(one) - start).norm()
    assert update > 1e-3 * start.norm()  # the runs trained
    gap = float((weights(two) - weights(one)).norm() / update)
    control = None if half is None else float((weights(half) - weights(one)).norm() / update)
    print(f"{two.name}: gap {gap:.2e}, half-batch control {control:.2e}")  # shown with -s
    return gap, control


@pytest.mark.slow
def test_warmup_two_ranks_equal_one_with_the_same_step_batch(setup) -> None:
    # With the adversarial warmup: two student passes before one backward under DDP, and the
    # discriminator's gradients averaged over the ranks.
    root = setup["root"]
    common = ["-c", str(setup["config"]), "--data", str(setup["index"]),
              "--set", "warmup.adversarial.enabled=true", "--set", "input.crop_size=[32,64]"]
    duda("warmup", *common, "--out", str(root / "w_one"), "--set", "warmup.batch_size=4")
    two = duda("warmup", *common, "--out", str(root / "w_two"), "--set", "warmup.batch_size=4",
               "--json", ranks=2)
    duda("warmup", *common, "--out", str(root / "w_half"), "--set", "warmup.batch_size=2")

    from stages.config import load_config
    from stages.nn.model import build_model
    from stages.runtime.seeding import seed_everything

    seed_everything(0)  # the start: the seeded random initialisation every run begins from
    start = build_model(load_config(setup["config"]).model, 19)
    start = torch.cat([v.float().flatten() for k, v in start.state_dict().items()
                       if v.is_floating_point() and "running" not in k])
    gap, control = relative_gaps(start, root / "w_one", root / "w_two", root / "w_half")
    assert gap < ADVERSARIAL, gap
    assert control > 0.1, control
    summary = json.loads(two.stdout)["summary"]
    assert (summary["processes"], summary["batch_per_step"], summary["sync_batchnorm"]) == (
        2, 4, True)
    assert summary["precision"] == "fp32"
    # Rank 0 alone wrote the metrics: one line per iteration, with the mean loss over ranks.
    lines = (root / "w_two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.slow
def test_self_train_two_ranks_equal_one_with_the_same_step_batch(trained) -> None:
    root, warmup = trained["root"], trained["warmup"]
    common = ["-c", str(trained["config"]), "--data", str(trained["index"]),
              "--checkpoint", str(warmup), "--pseudo", str(trained["pseudo"])]
    double = ["--set", "self_train.source_batch_size=4", "--set", "self_train.target_batch_size=4"]
    start = weights(warmup)

    # Terms normalised alike in both layouts: the source cross-entropy and the consistency
    # with the eval-mode teacher (offline/online terms and the offline update left out).
    alike = ["--set", "self_train.loss.offline=0", "--set", "self_train.loss.online=0",
             "--set", "self_train.loss.online_entropy=0", "--set", "self_train.loss.online_kld=0",
             "--set", "self_train.consistency_teacher_mode=eval",
             "--set", "self_train.offline_start=100"]
    duda("self-train", *common, *alike, *double, "--out", str(root / "a_one"))
    duda("self-train", *common, *alike, *double, "--out", str(root / "a_two"), ranks=2)
    duda("self-train", *common, *alike, "--out", str(root / "a_half"))
    gap, control = relative_gaps(start, root / "a_one", root / "a_two", root / "a_half")
    assert gap < EXACT, gap
    assert control > 0.1, control

    # The default step. Each rank computes the online and offline thresholds over its own
    # batch and normalises its pseudo-label losses by its own labelled pixels (DDP averages
    # the per-rank means), as the reference's two-GPU runs do, so two ranks are close to one
    # process with the double batch but not equal.
    duda("self-train", *common, *double, "--out", str(root / "d_one"))
    duda("self-train", *common, *double, "--out", str(root / "d_two"), ranks=2)
    duda("self-train", *common, "--out", str(root / "d_half"))
    gap, control = relative_gaps(start, root / "d_one", root / "d_two", root / "d_half")
    assert gap < PER_RANK, gap
    assert control > 2 * gap, (gap, control)
    # The store of the two-rank run is complete: every image was updated by one rank.
    manifest = json.loads((root / "d_two" / "pseudo" / "manifest.json").read_text())
    assert manifest["schema"].startswith("duda.pseudo_labels/")
    changes = manifest["summary"]["offline_changes"]
    assert sum(changes["kept"]) + sum(changes["added"]) > 0


@pytest.mark.slow
def test_self_train_resumes_under_torchrun_after_a_kill(trained) -> None:
    root = trained["root"]
    common = ["-c", str(trained["config"]), "--data", str(trained["index"]),
              "--checkpoint", str(trained["warmup"]), "--pseudo", str(trained["pseudo"]),
              "--set", "self_train.iterations=10"]
    duda("self-train", *common, "--out", str(root / "straight"), ranks=2)

    run = root / "killed"
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "duda_cli",
              "self-train", *common, "--out", str(run), "--device", "cpu"]
    process = subprocess.Popen(launch, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # past the first checkpoint
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches torchrun and both workers
    process.wait(timeout=60)
    assert not (run / "manifest.json").exists(), "the run finished before it was interrupted"
    assert (run / "train_state.pt").is_file()

    refused = duda("self-train", *common, "--out", str(run), "--resume", check=False)
    assert refused.returncode == 2
    assert "trained by 2 process(es), this launch has 1" in refused.stderr

    duda("self-train", *common, "--out", str(run), "--resume", ranks=2)
    torch.testing.assert_close(weights(run), weights(root / "straight"), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights(run, "teacher"), weights(root / "straight", "teacher"),
                               rtol=0, atol=1e-6)
    resumed = zarr.open_group(run / "pseudo", mode="r")
    straight = zarr.open_group(root / "straight" / "pseudo", mode="r")
    np.testing.assert_array_equal(resumed["labels"][:], straight["labels"][:])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(1, 11))


def test_single_process_commands_refuse_torchrun(tiny_config_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from duda_cli.app import app

    result = CliRunner().invoke(app, ["run", "-c", str(tiny_config_file), "--out",
                                      str(tmp_path / "runs")],
                                env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.exit_code == 2
    assert "`duda run` runs in one process; torchrun started 2" in result.stderr
    assert "launch it without torchrun" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_evaluate_two_ranks_report_what_one_does(trained) -> None:
    root = trained["root"]
    common = ["evaluate", "-c", str(trained["config"]), "--data", str(trained["index"]),
              "--checkpoint", str(trained["warmup"]), "--set", "evaluate.recalibration.enabled=true",
              "--set", "evaluate.recalibration.batches=2", "--set", "evaluate.save_predictions=true",
              "--set", "evaluate.inference.batch_size=1", "--json"]
    one = json.loads(duda(*common, "--out", str(root / "e_one")).stdout)
    two = json.loads(duda(*common, "--out", str(root / "e_two"), ranks=2).stdout)
    assert two["summary"] == one["summary"]
    reports = [json.loads((root / name / "report.json").read_text()) for name in ("e_one", "e_two")]
    assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"]
    assert sum(map(sum, reports[1]["confusion_matrix"])) > 0
    assert sorted(p.name for p in (root / "e_two" / "predictions").iterdir()) == sorted(
        p.name for p in (root / "e_one" / "predictions").iterdir())


@pytest.mark.slow
def test_every_rank_of_a_job_refused_by_the_lock_exits_2_at_once(trained) -> None:
    from stages.artifacts.writer import ArtifactLock

    out = trained["root"] / "locked"
    lock = ArtifactLock(out)
    lock.acquire()  # another job writes `out`
    try:
        started = time.monotonic()
        result = duda("evaluate", "-c", str(trained["config"]), "--data", str(trained["index"]),
                      "--checkpoint", str(trained["warmup"]), "--out", str(out), ranks=2,
                      check=False)
    finally:
        lock.release()
    # torchrun reports a failed job with its own exit code 1 and each rank's exit code
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr[-2000:]
    # rank 0 and rank 1 both report the refusal; neither waited for a collective timeout
    assert result.stderr.count(f"is being written by process {os.getpid()}") == 2
    assert time.monotonic() - started < 120
    assert not out.exists()
