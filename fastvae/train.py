"""Train a VAE with fastvae's loss: ``python -m fastvae.train`` or ``fastvae-train``.

With no arguments it trains on scikit-learn's handwritten digits (8 x 8, offline) on CUDA if present, else on
the CPU, and writes figures, ``metrics.jsonl`` and ``checkpoint.pt`` to ``runs/<timestamp>``. The same
command runs data-parallel under ``torchrun --nproc_per_node=N -m fastvae.train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

import fastvae

from .models import LATENTS, DiscreteVAE, build_model
from .nn import BetaTCVAELoss, ELBOLoss, ELBOOutput, MMDVAELoss

REFERENCE_BATCH = 256  # --lr is the learning rate at this global batch size
# the settings that may change when a run is resumed; everything else comes from the checkpoint
RESUMABLE = ("epochs", "out", "resume", "backend", "amp", "device", "data_dir", "download", "max_steps",
             "eval_samples", "debug_ranks")

DESCRIPTION = """\
Train a VAE with fastvae's fused loss. With no arguments: scikit-learn's handwritten digits (offline), on
CUDA if present, else the CPU; writes reconstructions.png, samples.png, latent.png (--latent-dim 2),
curves.png, metrics.jsonl and checkpoint.pt to --out."""

EPILOG = f"""\
learning rate and batch size (large batches are the point):
  --batch-size is per process: the global batch is B = batch-size x processes. --lr is the Adam rate at
  B = {REFERENCE_BATCH}; the run uses lr x B / {REFERENCE_BATCH} (--lr-scaling linear, Goyal et al. 2017), \
lr x sqrt(B / {REFERENCE_BATCH})
  (sqrt, gentler for Adam at very large B) or lr (none), reached by a linear warm-up from 0 over
  --lr-warmup.
  --lr-warmup and --kl-warmup take epochs ("5", "0.5") or optimizer steps ("200steps").

--resume restores a run's settings and state; only --epochs, --out, --backend, --amp, --device,
--data-dir, --download, --max-steps and --eval-samples may differ.

examples:
  python -m fastvae.train                                  # digits, well under a minute on a laptop CPU
  python -m fastvae.train --dataset mnist --download --model conv --batch-size 1024
  torchrun --nproc_per_node=4 -m fastvae.train --dataset mnist --batch-size 512   # B = 2048
  python -m fastvae.train --resume runs/20250101-120000 --epochs 200               # continue to 200
  python -m fastvae.train --objective iwae --num-samples 16 --eval-samples 1000   # IWAE, log p(x) estimate
  python -m fastvae.train --latent vq --codebook-size 256                         # VQ-VAE, 8 tokens an image
  python -m fastvae.train --latent rvq --num-quantizers 4                         # residual VQ, 4 stages
"""


class CLIError(Exception):
    """A problem with the command line or the environment, printed as one line (no traceback)."""


def _positive_int(s: str) -> int:
    if not s.lstrip("-").isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def _nonneg_float(s: str, least: float = 0.0, strict: bool = False) -> float:
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (v > least if strict else v >= least) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {least:g}, got {s!r}")
    return v


_positive_float = partial(_nonneg_float, strict=True)


def _duration(s: str) -> str:
    """Epochs ("5", "0.5") or optimizer steps ("200steps"); kept as the string (checkpoints store args)."""
    try:
        _nonneg_float(s[: -len("steps")] if s.endswith("steps") else s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be epochs ('5') or steps ('200steps'), got {s!r}") from None
    return s


def _to_steps(duration: str, steps_per_epoch: int) -> int:
    if duration.endswith("steps"):
        return int(float(duration[: -len("steps")]))
    return round(float(duration) * steps_per_epoch)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: X)", except for flags and unset options
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvae-train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_Formatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=("digits", "mnist", "fashion-mnist"),
                      help="digits: scikit-learn's, offline; mnist, fashion-mnist: torchvision")
    data.add_argument("--data-dir", default="data", metavar="DIR", help="where torchvision finds the files")
    data.add_argument("--download", action="store_true", help="let torchvision download a missing data set")
    model = p.add_argument_group("model and loss")
    model.add_argument("--model", default="mlp", choices=("mlp", "conv"), help="see fastvae/models.py")
    model.add_argument("--latent-dim", type=_positive_int, default=8, metavar="N", help="2: also latent.png")
    model.add_argument("--likelihood", default="gaussian",
                       choices=("gaussian", "gaussian-learned-var", "bernoulli", "dmol"),
                       help="p(x|z) = N(x_hat, --var), or with a learned variance per pixel; dmol: a "
                            "discretized mixture of logistics over 8-bit pixels (bits/dim reported)")
    model.add_argument("--num-mixtures", type=_positive_int, default=10, metavar="M",
                       help="logistic components per pixel for --likelihood dmol")
    model.add_argument("--var", type=_positive_float, default=0.02, help="the fixed variance of p(x|z)")
    model.add_argument("--beta", type=_nonneg_float, default=1.0, help="weight of the KL term")
    model.add_argument("--objective", default="elbo", choices=("elbo", "iwae") + LATENT_OBJECTIVES,
                       help="iwae: the importance-weighted bound over --num-samples samples of z; btcvae: "
                            "β-TCVAE; infovae: + --mmd-weight MMD; wae: recon + --mmd-weight MMD, no KL")
    model.add_argument("--latent", default="gaussian", choices=LATENTS,
                       help="the bottleneck: gaussian q(z|x); or --latent-dim tokens an image through a discrete "
                            "quantizer of fastvae.nn (vq: VectorQuantize, EMA codebook; rvq: ResidualVQ; lfq: "
                            "LFQ, log2 K bits a token; fsq: FSQ, the paper's levels for K; gumbel: taming's "
                            "GumbelQuantize), with codebook usage and perplexity in metrics.jsonl")
    model.add_argument("--codebook-size", type=_positive_int, default=256, metavar="K",
                       help="codes a token for the discrete latents (lfq: a power of 2; fsq: 2^8, 2^10, ... 2^16)")
    model.add_argument("--num-quantizers", type=_positive_int, default=4, metavar="S",
                       help="--latent rvq: residual stages")
    model.add_argument("--tc-beta", type=_nonneg_float, default=6.0, metavar="BETA",
                       help="--objective btcvae: weight of the total correlation")
    model.add_argument("--mi-weight", type=_nonneg_float, default=1.0, help="btcvae: of the mutual information")
    model.add_argument("--dw-weight", type=_nonneg_float, default=1.0, help="btcvae: of the dimension-wise KL")
    model.add_argument("--tc-estimator", default="mss", choices=("mss", "mws"), help="btcvae: see tc_decomposition")
    model.add_argument("--mmd-weight", type=_nonneg_float, default=10.0, metavar="LAMBDA",
                       help="--objective infovae / wae: weight of the MMD to the prior")
    model.add_argument("--mmd-kernel", default="imq", choices=("imq", "rbf"), help="infovae / wae: see fastvae.mmd")
    model.add_argument("--num-samples", type=_positive_int, default=8, metavar="K",
                       help="samples of z per image for --objective iwae")
    model.add_argument("--free-bits", type=_nonneg_float, default=0.0, metavar="NATS",
                       help="least KL counted per latent dim")
    model.add_argument("--kl-warmup", type=_duration, default="0", metavar="T",
                       help="linear beta warm-up from 0, in epochs or steps")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=_positive_int, default=100, metavar="N", help="total, also on --resume")
    opt.add_argument("--batch-size", type=_positive_int, default=128, metavar="N", help="per process")
    opt.add_argument("--lr", type=_positive_float, default=2e-3,
                     help=f"Adam learning rate at a global batch of {REFERENCE_BATCH}; see --lr-scaling")
    opt.add_argument("--lr-scaling", default="linear", choices=("linear", "sqrt", "none"),
                     help="how the learning rate follows the global batch size")
    opt.add_argument("--lr-warmup", type=_duration, default="2", metavar="T",
                     help="linear learning-rate warm-up, in epochs or steps")
    opt.add_argument("--seed", type=int, default=0, help="model init, data order and noise")
    run = p.add_argument_group("execution")
    run.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "compile"),
                     help="auto: fastvae's global setting (FASTVAE_BACKEND, default: the kernels on CUDA, eager "
                          "PyTorch elsewhere); triton: the kernels (CUDA, or CPU under TRITON_INTERPRET=1); "
                          "torch: eager PyTorch; compile: auto's path under torch.compile of the model. The "
                          "path that runs is printed at the start")
    run.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                     help="autocast the model to bfloat16, or to float16 with a gradient scaler")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda if there")
    run.add_argument("--out", default=None, metavar="DIR", help="runs/<timestamp>, or the resumed run folder")
    run.add_argument("--resume", default=None, metavar="PATH", help="run folder or checkpoint.pt to continue")
    run.add_argument("--eval-samples", type=_positive_int, default=None, metavar="K",
                     help="also estimate the held-out log p(x) with K importance samples each epoch")
    run.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                     help="stop after N optimizer steps in all (smoke tests)")
    run.add_argument("--debug-ranks", action="store_true", help=argparse.SUPPRESS)  # rank{r}.json per process
    return p


# ---------------------------------------------------------------------------------------------------- data


def load_data(name: str, data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, held-out images, held-out labels); images (N, C, H, W) float32 in [0, 1]."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise CLIError("--dataset digits needs scikit-learn: pip install scikit-learn") from None
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one fixed split
        test, train = perm[: len(x) // 5], perm[len(x) // 5:]
        return x[train], x[test], y[test]
    try:
        from torchvision import datasets
    except ImportError:
        raise CLIError(f"--dataset {name} needs torchvision: pip install torchvision from the index your torch came "
                       "from (a CPU torch: --index-url https://download.pytorch.org/whl/cpu)") from None
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        train, test = (cls(data_dir, train=t, download=download) for t in (True, False))
    except (RuntimeError, OSError) as e:
        where = Path(data_dir) / cls.__name__ / "raw"
        hint = "" if download else "; pass --download, or put the four *-ubyte.gz files there"
        raise CLIError(f"{name} not found in {where}{hint} ({str(e).splitlines()[0]})") from None
    return train.data[:, None] / 255.0, test.data[:, None] / 255.0, test.targets


# ------------------------------------------------------------------------------------------- distributed


def setup_device(choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda, but torch sees no CUDA device")
    cuda = torch.cuda.is_available() and choice != "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def seed_for(*parts) -> int:
    """A 63-bit seed per (base seed, rank, epoch, ...): independent streams, reproducible on resume."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ---------------------------------------------------------------------------------------------- training


def resolve_backend(choice: str, device: torch.device) -> tuple[str | None, str]:
    """(the ``backend=`` the model and losses take, the path their calls run, in words) for ``--backend``:
    "auto" and "compile" defer to fastvae's global setting (FASTVAE_BACKEND, ``fastvae.set_backend``) at each
    call, "triton" and "torch" pin it. The words are ``fastvae.active_path``'s ("triton", "triton
    (interpreter)" or "torch"), plus ", torch.compile": what runs, not what was asked for."""
    backend = choice if choice in ("triton", "torch") else None
    try:
        path = fastvae.active_path(device, torch.float32, backend)
    except ValueError as e:  # backend "triton" (asked for, or the global one) where the kernels cannot run
        raise CLIError(f"--backend {choice}: {e}") from None
    return backend, path + (", torch.compile" if choice == "compile" else "")


def learning_rate(args, step: int, steps_per_epoch: int, world: int) -> float:
    ratio = args.batch_size * world / REFERENCE_BATCH
    peak = args.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[args.lr_scaling]
    warmup = _to_steps(args.lr_warmup, steps_per_epoch)
    return peak * min(1.0, (step + 1) / warmup) if warmup > 0 else peak


def elbo_terms(net, loss_fn, x: torch.Tensor, gen, amp) -> ELBOOutput:
    """The model and the loss under ``amp()`` (autocast with --amp): the 16-bit decoder output goes to the
    loss kernels as it is, against the fp32 data, and the losses come out in fp32 (no cast in between)."""
    with amp():
        out = net(x, generator=gen)
        # the KL of the fused sampling pass; ELBOLoss recomputes it per latent dim only for free bits
        return loss_fn(out.x_hat, x, out.mu, out.logvar, out.logvar_x, kl=out.kl, return_terms=True)


def log_likelihood(loss_fn, x_hat: torch.Tensor, x: torch.Tensor, logvar_x: torch.Tensor | None) -> torch.Tensor:
    """log p(x|z) of K samples, (K, B), for x_hat of shape (K, B, ...) and x of shape (B, ...)."""
    k, b = x_hat.shape[:2]
    # the kernels take input and target of one shape: one copy of x per sample, flattened beside x_hat
    target = x.expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    return -loss_fn.recon(x_hat.flatten(0, 1), target, logvar_x, reduction="per_sample").view(k, b)


def iwae_terms(net, loss_fn, x: torch.Tensor, k: int, gen, amp) -> ELBOOutput:
    """The negated K-sample bound, batch mean, as the loss; recon and KL are the sample means of -log p(x|z)
    and of log q(z|x) - log p(z)."""
    with amp():
        out = net(x, generator=gen, num_samples=k)
        ll = log_likelihood(loss_fn, out.x_hat, x, out.logvar_x)
        bound = fastvae.iwae_bound(ll, out.log_ratio)
    return ELBOOutput(-bound.mean(), -ll.mean(), -out.log_ratio.mean(), 1.0)


def estimate_log_px(model, loss_fn, x: torch.Tensor, rank: int, world: int, k: int, gen, amp) -> float:
    """Mean held-out log p(x), importance-sampled with K samples an image (fastvae.estimate_log_likelihood)."""

    def ll(z, images):
        x_hat, logvar_x = model.decode(z.flatten(0, 1))
        return log_likelihood(loss_fn, x_hat.unflatten(0, z.shape[:2]), images, logvar_x)

    total = torch.zeros(2, dtype=torch.float64, device=x.device)
    with torch.no_grad(), amp():
        for chunk in x[rank::world].split(256):
            est = fastvae.estimate_log_likelihood(model.encode, ll, chunk, num_samples=k, generator=gen,
                                                  backend=loss_fn.backend)
            total += torch.stack([est.sum(), torch.tensor(float(len(chunk)), dtype=torch.float64,
                                                           device=x.device)])
    log_px, n = all_reduce(total).tolist()
    return log_px / max(n, 1.0)


def evaluate(model, loss_fn, x: torch.Tensor, rank: int, world: int, gen, amp) -> dict[str, float]:
    """Held-out recon and KL (beta 1, no free bits): rank r takes images r, r + world, ...; summed."""
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # recon, kl (times images), images
    discrete = isinstance(model, DiscreteVAE)
    counts = 0
    if discrete:  # no codebook update (EMA, k-means) from held-out images
        model.eval()
    with torch.no_grad():
        for chunk in x[rank::world].split(1024):
            if discrete:
                e, indices = discrete_terms(model, loss_fn, chunk, gen, amp)
                counts = counts + model.usage(indices).double()
            else:
                e = elbo_terms(model, loss_fn, chunk, gen, amp)
            sums += torch.stack([e.recon, e.kl, torch.ones_like(e.kl)]).double() * len(chunk)
    if discrete:
        model.train()
    recon, kl, n = all_reduce(sums).tolist()
    usage = usage_metrics(all_reduce(counts)) if discrete else {}
    return {"elbo": -(recon + kl) / n, "recon": recon / n, "kl": kl / n, **usage}


LATENT_OBJECTIVES = ("btcvae", "infovae", "wae")
LATENT_TERMS = {"btcvae": ("mutual_info", "total_correlation", "dimwise_kl"), "infovae": ("mmd",), "wae": ("mmd",)}


def latent_terms(net, latent_fn, x: torch.Tensor, gen, amp) -> tuple[ELBOOutput, list[torch.Tensor]]:
    """The batch-level objectives: the loss, recon and KL as an ELBOOutput, and their extra terms. The terms
    take a second sample of q(z|x) beside the decoder's (the model's output has no z): independent and of
    the same distribution, so the estimators' expectations are the same."""
    with amp():
        out = net(x, generator=gen)
        z = fastvae.reparameterize(out.mu, out.logvar, generator=gen, backend=latent_fn.backend)
        if isinstance(latent_fn, BetaTCVAELoss):
            t = latent_fn(out.x_hat, x, z, out.mu, out.logvar, out.logvar_x, return_terms=True)
            return ELBOOutput(t.loss, t.recon, out.kl, 1.0), [t.mutual_info, t.total_correlation, t.dimwise_kl]
        m = latent_fn(out.x_hat, x, z, out.mu, out.logvar, out.logvar_x, kl=out.kl, generator=gen,
                      return_terms=True)
        return ELBOOutput(m.loss, m.recon, m.kl, latent_fn.current_beta()), [m.mmd]


def discrete_terms(net, loss_fn, x: torch.Tensor, gen, amp) -> tuple[ELBOOutput, torch.Tensor]:
    """A discrete bottleneck's (loss = recon + beta * KL + the quantizer's loss, recon, KL, beta) and its indices.
    The KL to the uniform prior is a constant for the deterministic quantizers (log K a token, VQ-VAE's)."""
    with amp():
        out = net(x, generator=gen)
        recon = loss_fn.recon(out.x_hat, x, out.logvar_x)
        beta = loss_fn.current_beta()
        return ELBOOutput(recon + beta * out.kl + out.quantizer_loss, recon, out.kl, beta), out.indices


def usage_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Codebook usage of summed per-code counts (codebooks, K): the codes used and the perplexity exp(H(p)),
    p = counts / their sum, each a mean over the codebooks (the rvq stages)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return {"codebook_active": (counts > 0).double().sum(-1).mean().item(), "perplexity": perplexity.mean().item()}


def build_latent_fn(args, dataset_size: int, world: int, backend) -> ELBOLoss | None:
    """The loss of a batch-level --objective (None for elbo / iwae); btcvae over the global batch."""
    like = dict(likelihood=args.likelihood, var=args.var, full=True, backend=backend)
    if args.objective == "btcvae":
        return BetaTCVAELoss(dataset_size=dataset_size, tc_beta=args.tc_beta, mi_weight=args.mi_weight,
                             dw_weight=args.dw_weight, estimator=args.tc_estimator,
                             group=dist.group.WORLD if world > 1 else None, **like)
    if args.objective in ("infovae", "wae"):
        return MMDVAELoss(mmd_weight=args.mmd_weight, kernel=args.mmd_kernel,
                          beta=args.beta if args.objective == "infovae" else 0.0, **like)
    return None


def train_epoch(state: dict, epoch: int, x_train: torch.Tensor, gen, amp, bar) -> dict[str, float]:
    """One pass over this rank's shard; returns the epoch's means over all ranks and images/s."""
    args, net, loss_fn, opt = state["args"], state["net"], state["loss_fn"], state["opt"]
    state["sampler"].set_epoch(epoch)
    order = torch.tensor(list(state["sampler"]), device=x_train.device)
    sums = torch.zeros(4, dtype=torch.float64, device=x_train.device)  # loss, recon, kl (x images), images
    extra_names = LATENT_TERMS.get(args.objective, ())
    discrete = args.latent != "gaussian"
    if args.latent == "lfq":  # the LFQ entropies of the batches
        extra_names = ("lfq_per_sample_entropy", "lfq_codebook_entropy")
    extra_sums = torch.zeros(len(extra_names), dtype=torch.float64, device=x_train.device)
    counts = 0  # per-code counts of the epoch's indices, (codebooks, K), on the device
    t0 = shown = time.perf_counter()
    for batch in order.split(args.batch_size)[: state["steps_per_epoch"]]:
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, state["step"], state["steps_per_epoch"], state["world"])
        x = x_train[batch]
        if discrete:
            elbo, indices = discrete_terms(net, loss_fn, x, gen, amp)
            counts = counts + state["model"].usage(indices)
            if args.latent == "lfq":
                last = state["model"].quantizer.last
                extra_sums += torch.stack([last.per_sample_entropy, last.codebook_entropy]).double() * len(x)
        elif args.objective == "iwae":
            elbo = iwae_terms(net, loss_fn, x, args.num_samples, gen, amp)
        elif extra_names:
            elbo, extra = latent_terms(net, state["latent_fn"], x, gen, amp)
            extra_sums += torch.stack(extra).detach().double() * len(x)
        else:
            elbo = elbo_terms(net, loss_fn, x, gen, amp)
        opt.zero_grad(set_to_none=True)
        scaler = state["scaler"]
        scaler.scale(elbo.loss).backward()  # a no-op scale unless --amp fp16
        scaler.step(opt)
        scaler.update()
        loss_fn.step()  # advances the beta schedule
        state["step"], state["beta"] = state["step"] + 1, elbo.beta
        terms = torch.stack([elbo.loss, elbo.recon, elbo.kl, torch.ones_like(elbo.kl)]).detach()
        sums += terms.double() * len(x)
        if args.debug_ranks:  # kept on the device: read once, after training (no host sync in the step)
            state["losses"].append(elbo.loss.detach())
        bar.update()
        if not bar.disable and time.perf_counter() - shown > 0.25:  # a host sync, a few times a second
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{elbo.loss.item():.2f}",
                            img_s=f"{sums[3].item() * state['world'] / (shown - t0):,.0f}")
    seconds = time.perf_counter() - t0
    loss, recon, kl, n = all_reduce(sums).tolist()
    if not math.isfinite(loss):
        raise CLIError(f"the loss is {loss} in epoch {epoch}: lower --lr, or try --lr-scaling sqrt or a "
                       "longer --lr-warmup")
    n = max(n, 1.0)
    extra = dict(zip(extra_names, (v / n for v in all_reduce(extra_sums).tolist()))) if extra_names else {}
    if discrete:
        extra.update(usage_metrics(all_reduce(torch.as_tensor(counts, device=x_train.device).double())))
    return {"elbo": -(recon + kl) / n, "recon": recon / n, "kl": kl / n, "loss": loss / n, **extra,
            "images_per_s": n / seconds, "epoch_s": seconds}


# --------------------------------------------------------------------------------------------- outputs


def _grid(images: torch.Tensor, ncol: int):
    """(N, C, H, W) in [0, 1] -> one (rows (H+1), ncol (W+1), C) array with 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = -(-n // ncol)
    out = torch.ones(rows * (h + 1) - 1, ncol * (w + 1) - 1, c)
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, q = divmod(i, ncol)
        out[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = img.permute(1, 2, 0)
    return (out[..., 0] if c == 1 else out).numpy()


def _show(ax, images: torch.Tensor, ncol: int, title: str) -> None:
    ax.imshow(_grid(images, ncol), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def write_figures(out: Path, model, x_test, y_test, history: list[dict], seed: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any process

    model.eval()
    with torch.no_grad():
        x = x_test[:16]
        fig = Figure(figsize=(8, 1.6), layout="constrained")
        top, bottom = fig.subplots(2, 1)
        _show(top, x, 16, "held-out inputs")
        _show(bottom, model.mean(model.decode(model.encode(x)[0])[0]), 16, "reconstructions (decoder mean at z = mu)")
        fig.savefig(out / "reconstructions.png", dpi=150)

        gen = torch.Generator(x_test.device).manual_seed(seed)
        fig = Figure(figsize=(5, 5.3), layout="constrained")
        prior = "uniform codes" if isinstance(model, DiscreteVAE) else "z ~ N(0, I)"
        _show(fig.subplots(), model.sample(64, generator=gen), 8, f"samples: decoder mean, {prior}")
        fig.savefig(out / "samples.png", dpi=150)

        if model.latent_dim == 2:
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.03, 0.97, 15))
            z = torch.stack(torch.meshgrid(q, -q, indexing="xy"), -1).reshape(-1, 2).to(x_test.device)
            mu = torch.cat([model.encode(c)[0] for c in x_test.split(1024)]).cpu()
            fig = Figure(figsize=(10, 5), layout="constrained")
            left, right = fig.subplots(1, 2)
            _show(left, model.mean(model.decode(z)[0]), 15, "decoder over z in N(0, I) quantiles 0.03 .. 0.97")
            points = right.scatter(mu[:, 0], mu[:, 1], c=y_test.cpu(), cmap="tab10", s=6)
            right.set(title="held-out posterior means", xlabel="z1", ylabel="z2")
            fig.colorbar(points, ax=right, label="label")
            fig.savefig(out / "latent.png", dpi=150)
    model.train()

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    epochs = [m["epoch"] for m in history]
    for ax, key, title in zip(fig.subplots(1, 3), ("elbo", "recon", "kl"),
                              ("ELBO (nats / image)", "reconstruction -log p(x|z)", "KL(q(z|x) || p(z))")):
        for split, label in (("train", "train"), ("test", "held-out")):
            ax.plot(epochs, [m[f"{split}_{key}"] for m in history], marker="." if len(epochs) < 30 else "",
                    label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "curves.png", dpi=150)


def summary_table(history: list[dict]) -> str:
    cols = [("epoch", "epoch", "{:d}"), ("train ELBO", "train_elbo", "{:.2f}"),
            ("held-out ELBO", "test_elbo", "{:.2f}"), ("recon", "test_recon", "{:.2f}"),
            ("KL", "test_kl", "{:.2f}"), ("beta", "beta", "{:.2f}"), ("images/s", "images_per_s", "{:,.0f}"),
            ("peak MiB", "peak_mem_mb", "{:,.0f}")]
    if history and "test_bpd" in history[0]:
        cols.insert(5, ("bits/dim", "test_bpd", "{:.3f}"))
    rows = history if len(history) <= 12 else [history[round(i * (len(history) - 1) / 11)] for i in range(12)]
    cells = [[name for name, _, _ in cols]] + [[fmt.format(m[key]) for _, key, fmt in cols] for m in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CLIError as e:
        print(f"fastvae-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401  (the figures, at the end)
        from tqdm.auto import tqdm
    except ImportError:
        raise CLIError("needs tqdm and matplotlib: pip install tqdm matplotlib") from None
    ckpt = None
    if args.resume:
        path = Path(args.resume)
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise CLIError(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        vars(args).update({k: v for k, v in ckpt["args"].items() if k not in RESUMABLE})
        args.out = args.out or str(path.parent)
    rank, world, device = setup_device(args.device)
    out = [args.out or time.strftime("runs/%Y%m%d-%H%M%S")]
    if world > 1:
        dist.broadcast_object_list(out)  # one folder, named by rank 0
    out = Path(out[0])

    if args.download and world > 1 and rank != 0:
        dist.barrier()  # rank 0 downloads first
    x_train, x_test, y_test = load_data(args.dataset, args.data_dir, args.download)
    if args.download and world > 1 and rank == 0:
        dist.barrier()
    x_train, x_test = x_train.to(device), x_test.to(device)

    torch.manual_seed(args.seed)  # the same initial parameters on every rank
    backend, path = resolve_backend(args.backend, device)
    decoder = dict(learned_var=args.likelihood == "gaussian-learned-var", logits=args.likelihood == "bernoulli",
                   backend=backend, num_mixtures=args.num_mixtures if args.likelihood == "dmol" else None)
    if args.latent == "gaussian":
        model = build_model(args.model, tuple(x_train.shape[1:]), args.latent_dim, **decoder).to(device)
    else:
        if args.objective != "elbo" or args.eval_samples:
            raise CLIError(f"--latent {args.latent} trains the ELBO: --objective elbo and no --eval-samples")
        try:
            model = DiscreteVAE(args.model, tuple(x_train.shape[1:]), args.latent, args.latent_dim,
                                args.codebook_size, args.num_quantizers, **decoder).to(device)
        except ValueError as e:
            raise CLIError(f"--latent {args.latent}: {e}") from None
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = torch.utils.data.DistributedSampler(range(len(x_train)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise CLIError(f"--batch-size {args.batch_size} is more than the {len(sampler)} training images per "
                       "process")
    kl_steps = _to_steps(args.kl_warmup, steps_per_epoch)
    schedule = (lambda step: args.beta * min(1.0, step / kl_steps)) if kl_steps > 0 else None
    loss_fn = ELBOLoss(likelihood=args.likelihood, var=args.var, beta=args.beta, free_bits=args.free_bits,
                       beta_schedule=schedule, full=True, backend=backend, num_mixtures=args.num_mixtures)
    history, start = [], 1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loss_fn.steps, start = ckpt["step"], ckpt["epoch"] + 1
        history = ckpt["history"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                        else None)
    if args.backend == "compile":
        net = torch.compile(net)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    amp = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext
    # fp16's range needs the loss scaled up before backward (and the step skipped on an overflow)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if ckpt is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    # this rank's noise, reseeded per epoch from (seed, rank, epoch); torch.compile cannot trace an explicit
    # generator (a graph break), so there it comes from torch's default generator, seeded the same way
    gen = None if args.backend == "compile" else torch.Generator(device)
    eval_gen = torch.Generator(device)
    state = {"args": args, "net": net, "model": model, "loss_fn": loss_fn, "opt": opt, "sampler": sampler,
             "world": world,
             "steps_per_epoch": steps_per_epoch, "step": loss_fn.steps, "beta": loss_fn.current_beta(),
             "losses": [], "scaler": scaler,
             "latent_fn": build_latent_fn(args, len(x_train), world, backend)}
    noise_head = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "w") as f:  # a resumed run keeps its epochs up to the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in history)
        print(f"fastvae-train: {args.dataset} ({len(x_train)} train, {len(x_test)} held-out), {args.model} "
              f"VAE, {world} x {device}, backend {path}, {args.epochs} epochs -> {out}")
        if start > args.epochs:
            print(f"the checkpoint is at epoch {start - 1}: pass --epochs > {start - 1} to train on")

    t_start = time.perf_counter()
    for epoch in range(start, args.epochs + 1):
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
        seed = seed_for(args.seed, rank, epoch)
        torch.manual_seed(seed) if gen is None else gen.manual_seed(seed)
        if noise_head is None:  # the start of this rank's noise, for --debug-ranks
            peek = torch.Generator(device).manual_seed(seed)
            noise_head = torch.randn(8, generator=peek, device=device).tolist()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", unit="step", leave=False,
                  disable=None if rank == 0 else True, dynamic_ncols=True) as bar:
            train = train_epoch(state, epoch, x_train, gen, amp, bar)
        # the same held-out noise every epoch, so that epochs compare on equal terms
        eval_gen.manual_seed(seed_for(args.seed, rank))
        test = evaluate(model, loss_fn, x_test, rank, world, eval_gen, amp)
        if args.eval_samples:
            test["log_px"] = estimate_log_px(model, loss_fn, x_test, rank, world, args.eval_samples, eval_gen, amp)
        mem = all_reduce(torch.tensor([peak_memory_mb(device)], device=device), dist.ReduceOp.MAX).item()
        speed = {k: train.pop(k) for k in ("images_per_s", "epoch_s")}
        metrics = {"epoch": epoch, "step": state["step"], **{f"train_{k}": v for k, v in train.items()},
                   **{f"test_{k}": v for k, v in test.items()}, "beta": state["beta"],
                   "lr": opt.param_groups[0]["lr"], **speed, "peak_mem_mb": mem, "world_size": world}
        if args.likelihood == "dmol":  # the negative ELBO of the 8-bit images in bits per dim
            metrics["train_bpd"], metrics["test_bpd"] = (
                -metrics[f"{k}_elbo"] / (math.prod(x_train.shape[1:]) * math.log(2.0)) for k in ("train", "test"))
        history.append(metrics)
        if rank == 0:
            log_px = f"  log p(x) ~ {test['log_px']:8.2f}" if "log_px" in test else ""
            tqdm.write(f"epoch {epoch:3d}  train {'IWAE' if args.objective == 'iwae' else 'ELBO'} "
                       f"{train['elbo']:8.2f}  held-out ELBO {test['elbo']:8.2f}"
                       f"  recon {test['recon']:8.2f}  KL {test['kl']:6.2f}{log_px}"
                       f"  {speed['images_per_s']:,.0f} images/s", file=sys.stdout)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            ckpt = {"epoch": epoch, "step": state["step"], "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "args": vars(args),
                    "history": history}
            torch.save(ckpt, out / "checkpoint.tmp")
            os.replace(out / "checkpoint.tmp", out / "checkpoint.pt")  # never a half-written checkpoint

    if args.debug_ranks:
        params = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
        with open(out / f"rank{rank}.json", "w") as f:
            losses = torch.stack(state["losses"]).tolist() if state["losses"] else []
            json.dump({"rank": rank, "world_size": world, "noise_head": noise_head, "losses": losses,
                       "param_sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
                       "metrics": history[-1] if history else None}, f)
    if rank == 0:
        write_figures(out, model, x_test, y_test, history, args.seed)
        if history:
            print(summary_table(history))
            best = max(history, key=lambda m: m["test_elbo"])
            print(f"best held-out ELBO {best['test_elbo']:.2f} nats at epoch {best['epoch']}; "
                  f"{time.perf_counter() - t_start:.1f} s; files in {out}")
            if "test_bpd" in best:
                print(f"held-out negative ELBO {best['test_bpd']:.3f} bits/dim (8-bit pixels)")
            if "test_log_px" in history[-1]:
                print(f"held-out log p(x) ~ {history[-1]['test_log_px']:.2f} nats (K = {args.eval_samples} "
                      "importance samples an image), the ELBO's bound tightened")
    return 0


if __name__ == "__main__":
    sys.exit(main())
