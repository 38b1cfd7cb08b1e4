"""The device checks of bench/gpu.sh that are no benchmark of their own.

    python bench/gpu_checks.py ceilings    # bf16 matmul TFLOP/s and device copy GB/s: what the GPU gives
    python bench/gpu_checks.py agreement   # one training step in bf16 vs fp32, GAN on and off

``agreement`` builds the sd-vae-ft recipe's ft-EMA step (:class:`vaeft.train.step.TrainStep`,
random LPIPS backbone) twice from the same initial weights and runs one step on the same batch
and noise, once in fp32 and once in the recipe's bf16 (LPIPS backbone in bf16 too, as the engine
does): the loss's relative difference and the cosine of the generator's gradients (issue 17: >= 0.99
with the GAN on). ``--small`` runs both at toy size (the CPU dry run of bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import torch

COSINE_MIN = 0.99


def ceilings(device: torch.device, small: bool) -> None:
    n = 512 if small else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 3 if small else 10
    t = common.timed(lambda: [a @ b for _ in range(reps)], device)
    print(f"ceiling matmul bf16 {n}x{n}x{n}: {2 * n**3 * reps / t / 1e12:.4g} TFLOP/s")
    numel = (8 if small else 1024) * 2**20  # bytes / 4 (fp32): 32 MiB or 4 GiB
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = common.timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    print(f"ceiling device copy {numel * 4 / 2**30:.2f} GiB: {2 * numel * 4 * reps / t / 1e9:.4g} GB/s "
          f"(bytes read + written)")


def _flat_grads(step) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in step.g_params if p.grad is not None])


def agreement(device: torch.device, small: bool, batch: int) -> bool:
    import train_step as ts

    scale = "smoke" if small else "sd"
    res = 32 if small else 256
    arch = ts.make_arch(scale, res)
    x_u8 = torch.from_numpy(common.photo_batch(batch, res)).to(device)
    ok = True
    for gan in (True, False):
        base = ts.make_cfg(scale, batch, compile=False)
        if not gan:
            base = base.model_copy(update={"gan": None})
        out = {}
        for precision in ("fp32", "bf16"):
            cfg = base.model_copy(update={"precision": precision})
            step = ts.build_vaeft(cfg, arch, device, 0)
            result = step(0, iter([x_u8]))
            out[precision] = (float(result.logs["loss"]), _flat_grads(step), bool(result.finite))
            del step
        (l32, g32, ok32), (l16, g16, ok16) = out["fp32"], out["bf16"]
        cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
        rel = abs(l16 - l32) / max(abs(l32), 1e-12)
        norm_ratio = float(g16.norm() / g32.norm())
        passed = ok32 and ok16 and cos >= COSINE_MIN
        ok = ok and passed
        print(f"agreement GAN {'on ' if gan else 'off'}: loss fp32 {l32:.6g} bf16 {l16:.6g} (rel diff {rel:.2e}); "
              f"generator gradient cosine {cos:.5f}, norm ratio bf16/fp32 {norm_ratio:.4f} "
              f"(target cosine >= {COSINE_MIN}: {'met' if passed else 'NOT met'})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["ceilings", "agreement"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true", help="toy sizes (the CPU dry run)")
    ap.add_argument("--batch", type=int, default=None, help="agreement: batch (default 4, --small 2)")
    common.add_weights_dir_arg(ap)
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    print(common.machine_line(device))
    if args.check == "ceilings":
        ceilings(device, args.small)
        return 0
    common.ensure_torchvision()
    with common.random_weight_store(args.weights_dir):
        # The verdict is in the lines (and gpu.sh's summary); the exit status says the check ran.
        agreement(device, args.small, args.batch or (2 if args.small else 4))
        return 0


if __name__ == "__main__":
    sys.exit(main())
