"""The worker of test_latent's two-process test, in a module of its own: each spawned process imports it
(torch and fastvae only, not the test module's triton)."""

import torch

import fastvae


def distributed_rank(rank: int, world: int, init: str, backend: str, rows: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(11)
        z_all, mu_all, lv_all = (torch.randn(world * rows, 5, generator=g) for _ in range(3))
        lv_all = 0.5 * lv_all - 1.0
        mine = slice(rank * rows, (rank + 1) * rows)
        for estimator in ("mss", "mws"):
            full = [t.clone().requires_grad_() for t in (z_all, mu_all, lv_all)]
            ref = fastvae.tc_decomposition(*full, dataset_size=100, estimator=estimator, backend=backend)
            (ref.mutual_info + 2 * ref.total_correlation + 3 * ref.dimwise_kl).backward()
            local = [t[mine].clone().requires_grad_() for t in (z_all, mu_all, lv_all)]
            out = fastvae.tc_decomposition(*local, dataset_size=100, estimator=estimator, group=dist.group.WORLD,
                                           backend=backend)
            (out.mutual_info + 2 * out.total_correlation + 3 * out.dimwise_kl).backward()
            shares = torch.stack(out[:3]).detach()
            dist.all_reduce(shares)  # each rank's share of the global means
            torch.testing.assert_close(shares, torch.stack(ref[:3]).detach(), rtol=1e-5, atol=1e-5)
            for a, e in zip(local, full):
                torch.testing.assert_close(a.grad, e.grad[mine], rtol=1e-5, atol=1e-5)
            per = fastvae.tc_decomposition(*local, dataset_size=100, estimator=estimator, reduction="none",
                                           group=dist.group.WORLD, backend=backend)
            ref_per = fastvae.tc_decomposition(*full, dataset_size=100, estimator=estimator, reduction="none",
                                               backend=backend)
            for a, e in zip(per[:3], ref_per[:3]):
                torch.testing.assert_close(a, e[mine], rtol=1e-5, atol=1e-5)
        # unequal row counts: found (a ValueError on every rank, before any gather) when value checks are on
        fastvae.set_default_validate_args(True)
        try:
            short = [t[mine][: rows - rank] for t in (z_all, mu_all, lv_all)]
            try:
                fastvae.tc_decomposition(*short, dataset_size=100, group=dist.group.WORLD, backend=backend)
            except ValueError as e:
                assert "same number of rows" in str(e), e
            else:
                raise AssertionError("unequal rows not reported")
        finally:
            fastvae.set_default_validate_args(None)
    finally:
        dist.destroy_process_group()
