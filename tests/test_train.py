"""The trainer's entry point, ``fastvae.train.main`` / ``python -m fastvae.train``, on scikit-learn's digits
(offline): outputs, resume, argument errors, and a 2-process gloo run under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvae

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from fastvae import train  # noqa: E402

# keys of a metrics line that measure the machine rather than the model
TIMING = {"images_per_s", "epoch_s", "peak_mem_mb"}
FIGURES = ("reconstructions.png", "samples.png", "latent.png", "curves.png")
BASE = ["--epochs", "2", "--latent-dim", "2", "--batch-size", "64", "--device", "cpu"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def model_metrics(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(model_metrics(a), model_metrics(b)):
        assert x == pytest.approx(y, rel=1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: one thread is as fast, and keeps the suite quick beside other processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert train.main([*BASE, "--out", str(out)]) == 0
    return out


def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "fastvae.train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: fastvae-train" in r.stdout
    assert "lr x B / 256" in r.stdout and "torchrun" in r.stdout


def test_outputs_written_and_readable(run, capsys):
    from matplotlib.image import imread

    for name in FIGURES:
        image = imread(run / name)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, name
    lines = read_metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("train_elbo", "train_recon", "train_kl", "test_elbo", "test_recon", "test_kl",
                "images_per_s", "peak_mem_mb"):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert all(m["images_per_s"] > 0 for m in lines)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["latent_dim"] == 2


def test_heldout_elbo_improves(run):
    first, last = read_metrics(run)
    assert last["test_elbo"] > first["test_elbo"]
    assert last["train_loss"] < first["train_loss"]
    # the ELBO is minus the two terms
    assert last["test_elbo"] == pytest.approx(-(last["test_recon"] + last["test_kl"]))


def test_resume_continues_epochs_and_metrics(run, tmp_path, capsys):
    """1 epoch, then --resume to 2: the same metrics as the uninterrupted 2-epoch run."""
    assert train.main([*BASE, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert len(read_metrics(tmp_path)) == 1
    assert train.main(["--resume", str(tmp_path), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "epoch   2  train ELBO" in printed and "best held-out ELBO" in printed  # epoch lines, summary
    resumed = read_metrics(tmp_path)
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert_same_metrics(resumed, read_metrics(run))


def test_options(tmp_path):
    """conv model, learned variance, free bits, KL warm-up in steps, bf16 autocast, the eager backend."""
    args = ["--model", "conv", "--likelihood", "gaussian-learned-var", "--free-bits", "0.1", "--kl-warmup",
            "4steps", "--amp", "bf16", "--backend", "torch", "--max-steps", "3", "--lr-scaling", "sqrt"]
    assert train.main([*BASE, *args, "--out", str(tmp_path)]) == 0
    (line,) = read_metrics(tmp_path)  # --max-steps stops inside the first epoch
    assert line["step"] == 3 and line["beta"] == 0.5  # the beta of step 3 of a 4-step warm-up
    assert all(math.isfinite(v) for v in line.values())


@pytest.mark.parametrize("latent", ["vq", "rvq", "lfq", "fsq", "gumbel"])
def test_discrete_latents_log_codebook_usage(latent, tmp_path):
    """Two steps with each discrete bottleneck: metrics.jsonl holds the codebook usage (active codes,
    perplexity; the entropies for lfq) of the train and held-out passes, the figures are written, and the
    checkpoint restores the quantizer's state."""
    args = ["--latent", latent, "--codebook-size", "256", "--num-quantizers", "2", "--max-steps", "2",
            "--epochs", "1", "--latent-dim", "3", "--batch-size", "32", "--device", "cpu"]
    assert train.main([*args, "--out", str(tmp_path)]) == 0
    (line,) = read_metrics(tmp_path)
    keys = ["codebook_active", "perplexity"] + (["lfq_per_sample_entropy", "lfq_codebook_entropy"]
                                                 if latent == "lfq" else [])
    for split in ("train", "test"):
        for key in keys[:2]:
            assert math.isfinite(line[f"{split}_{key}"]), (split, key)
        # at least one code used, never more than the codebook (or the tokens seen) holds
        assert 1 <= line[f"{split}_codebook_active"] <= 256
        assert 1 <= line[f"{split}_perplexity"] <= line[f"{split}_codebook_active"] + 1e-6
    for key in keys[2:]:
        assert math.isfinite(line[f"train_{key}"]) and line[f"train_{key}"] >= 0
    assert line["train_codebook_active"] <= 2 * 32 * 3  # the tokens of two batches
    stages = 2 if latent == "rvq" else 1
    if latent != "gumbel":  # one code a token: the KL to the uniform prior is log K a token (and stage)
        assert line["test_kl"] == pytest.approx(3 * stages * math.log(256))
    assert all(math.isfinite(v) for v in line.values())
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "latent.png").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["latent"] == latent
    if latent in ("vq", "rvq"):  # the EMA codebook and its k-means flag travel in the checkpoint
        assert ckpt["model"]["quantizer._codebook.initted"].item() == 1


def test_discrete_resume_restores_the_codebook(tmp_path):
    """--latent vq, 1 epoch then --resume to 2: the metrics of the uninterrupted run (the EMA codebook and its
    statistics come back from the checkpoint, and the k-means initialization does not run again)."""
    args = ["--latent", "vq", "--codebook-size", "32", "--latent-dim", "2", "--batch-size", "256", "--device", "cpu"]
    assert train.main([*args, "--epochs", "2", "--out", str(tmp_path / "full")]) == 0
    assert train.main([*args, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    assert train.main(["--resume", str(tmp_path / "part"), "--epochs", "2"]) == 0
    assert_same_metrics(read_metrics(tmp_path / "part"), read_metrics(tmp_path / "full"))


@pytest.mark.parametrize("argv, message", [
    (["--latent", "vq", "--objective", "iwae"], "--latent vq trains the ELBO"),
    (["--latent", "fsq", "--codebook-size", "100"], "--latent fsq: FSQ levels are tabulated"),
    (["--latent", "lfq", "--codebook-size", "100"], "--latent lfq: lfq needs a codebook size that is a power"),
])
def test_discrete_latent_errors_are_one_line(argv, message, tmp_path, capsys):
    assert train.main([*BASE, *argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "-1"], "--lr: must be a number"),
    (["--kl-warmup", "soon"], "--kl-warmup: must be epochs"),
    (["--model", "rnn"], "--model: invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], ("needs torchvision: pip install torchvision", "mnist not found in")),
    (["--resume", "{tmp}/nothing"], ("--resume: no checkpoint at",)),
    (["--batch-size", "5000"], ("is more than the 1438 training images",)),
])
def test_environment_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert train.main([*argv, "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastvae-train: error: "), err
    assert any(m in err for m in message), err


def test_prints_the_path_that_runs(monkeypatch, tmp_path, capsys):
    """The start line names the path the calls take (fastvae.active_path), not the flag: on CPU the default
    follows the global setting, "triton" needs CUDA or the interpreter, and the interpreter is named."""
    from fastvae import _checks

    cpu = torch.device("cpu")
    monkeypatch.setattr(_checks, "_BACKEND", None)  # the default setting, whatever the environment says
    assert train.build_parser().parse_args([]).backend == "auto"
    assert train.resolve_backend("auto", cpu) == (None, "torch")
    assert train.resolve_backend("torch", cpu) == ("torch", "torch")
    assert train.resolve_backend("compile", cpu) == (None, "torch, torch.compile")
    with pytest.raises(train.CLIError, match="--backend triton: backend='triton' needs"):
        train.resolve_backend("triton", cpu)
    monkeypatch.setattr(_checks, "interpreting", lambda: True)
    assert train.resolve_backend("triton", cpu) == ("triton", "triton (interpreter)")
    assert train.resolve_backend("auto", cpu) == (None, "torch")  # the global default: kernels on CUDA only
    with fastvae.use_backend("triton"):
        assert train.resolve_backend("auto", cpu) == (None, "triton (interpreter)")
        assert train.resolve_backend("torch", cpu) == ("torch", "torch")
    monkeypatch.setattr(_checks, "interpreting", lambda: False)
    with fastvae.use_backend("triton"):  # the global "triton" where it cannot run: one line, exit 1
        assert train.main([*BASE, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastvae-train: error: --backend auto: backend='triton' needs") and err.count("\n") == 1
    assert train.main([*BASE, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    assert "1 x cpu, backend torch, 2 epochs" in capsys.readouterr().out


def test_no_host_sync_in_the_step(monkeypatch, tmp_path):
    """The training step reads nothing back to the host: fastvae's reads of a tensor's value (item, tolist,
    bool, float, int) in a run do not grow with its steps (only the per-epoch logging and the held-out pass
    read). --debug-ranks keeps its per-step losses on the device until the end. (torch's Adam reads its
    step counts, CPU tensors that need no sync: only reads made by fastvae's own code are counted.)"""
    monkeypatch.setattr(train, "write_figures", lambda *a, **k: None)
    counts = {}
    package = str(Path(fastvae.__file__).parent)

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename
            if where.startswith(package):
                counts[where, name] = counts.get((where, name), 0) + 1
            return real(self, *args, **kwargs)

        return read

    def reads(steps: int, *extra: str) -> dict:
        counts.clear()
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, counting(name))
            out = tmp_path / f"{steps}{''.join(extra)}"
            assert train.main([*BASE, "--epochs", "1", "--max-steps", str(steps), *extra, "--out", str(out)]) == 0
        return dict(counts)

    assert reads(1) == reads(4)
    assert reads(1, "--debug-ranks") == reads(4, "--debug-ranks")
    assert reads(1, "--objective", "iwae", "--num-samples", "2") == reads(3, "--objective", "iwae",
                                                                            "--num-samples", "2")
    assert reads(1, "--latent", "vq") == reads(3, "--latent", "vq")  # the EMA codebook and usage counts


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_torchrun_two_gloo_processes(tmp_path):
    """Two CPU processes: parameters stay identical, each rank draws its own noise, the loss falls, and a
    rerun with the same seed gives the same metrics."""

    def launch(out: Path) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastvae.train", *BASE, "--out", str(out), "--debug-ranks"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]

    r0, r1 = launch(tmp_path / "a")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["param_sha256"] == r1["param_sha256"]
    assert r0["noise_head"] != r1["noise_head"]
    assert r0["losses"] != r1["losses"]  # each rank trains on its own shard with its own noise
    for r in (r0, r1):
        assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
    assert model_metrics([r0["metrics"]]) == model_metrics([r1["metrics"]])  # reduced over the ranks
    lines = read_metrics(tmp_path / "a")
    assert [m["world_size"] for m in lines] == [2, 2]
    assert not (tmp_path / "a" / "rank1").exists()
    again = launch(tmp_path / "b")
    assert again[0]["param_sha256"] == r0["param_sha256"]
    assert_same_metrics(read_metrics(tmp_path / "b"), lines)
