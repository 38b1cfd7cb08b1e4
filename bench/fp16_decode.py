"""What the fp16 checks cost, and how exact the rescaling is, on the embedded and the SD-size decoder.

    python bench/fp16_decode.py [--device auto] [--archs embedded sd-size] [--sizes 64 128] [--repeat 2]

Per architecture and image size, side by side in one run: the decode of one latent in fp32 and
in fp16 (real fp16 kernels, and fp16 emulated on fp32 kernels: what `vaeft check-fp16` and the
end of `vaeft train fp16` run on CPU), their ratios, the emulation's largest relative peak error
against the real fp16 kernels, and the
exact rescaling's effect: an inflation by 1e4 of the residual stream and hidden outputs, then
`fit_rescale` back to 1000, each as the largest relative change of the fp32 output. Random
weights (the SD-size decoder is not downloaded): timings and exactness only. On CPU torch's fp16
convolutions take its slow (non-oneDNN) path, which is why the fp16 phase is not a stage of the
default DVC pipeline (README, "fp16-safe decoders").
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import machine_line, pick_device, timed

from vaeft.config import ArchitectureParams
from vaeft.model.build import build_autoencoder
from vaeft.model.fp16 import decode_fp16
from vaeft.model.probes import ActivationProbe
from vaeft.model.rescale import fit_rescale, rescale_decoder

ARCHS = {
    "embedded": ArchitectureParams(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8,
                                   sample_size=64),
    "sd-size": ArchitectureParams(),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    ap.add_argument("--smoke", action="store_true", help="embedded model, 32 px, one repeat")
    args = ap.parse_args()
    device = pick_device(args.device)
    archs = {"embedded": ARCHS["embedded"]} if args.smoke else {k: ARCHS[k] for k in args.archs}
    sizes, repeat = ([32], 1) if args.smoke else (args.sizes, args.repeat)
    print(machine_line(device))
    print(f"{'model':<9} {'size':>5} {'fp32 s':>8} {'fp16 s':>8} {'fp16/fp32':>9} {'emulated s':>10} {'emu/fp32':>8} "
          f"{'emu peak err':>12} {'inflate rel':>12} {'refit rel':>10}", flush=True)
    for name, arch in archs.items():
        torch.manual_seed(0)
        vae = build_autoencoder(arch).eval().to(device)
        half = torch.nn.Module.to(copy.deepcopy(vae), dtype=torch.float16)
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device) / 0.18215
            t32 = min(timed(lambda v=vae, z=z: v.decode(z), device) for _ in range(repeat))
            t16 = min(timed(lambda h=half, z=z: h.decode(z.half()), device) for _ in range(repeat))
            emu = copy.deepcopy(vae)
            te = min(timed(lambda e=emu, z=z: decode_fp16(e, z, device, emulate=True), device) for _ in range(repeat))
            _, p_emu = decode_fp16(copy.deepcopy(vae), z, device, emulate=True)
            _, p_nat = decode_fp16(copy.deepcopy(vae), z, device, emulate=False)
            peak_err = max(abs(p_emu.peaks[k] / p_nat.peaks[k] - 1) for k in p_nat.peaks if p_nat.peaks[k] > 0)
            ref = vae.decode(z).sample
            work = copy.deepcopy(vae)
            probe = ActivationProbe(work)
            hidden = {p.name.removesuffix(".conv1"): 1e4 for p in probe.points if p.kind == "hidden"}
            rescale_decoder(work, [1e4] * len(work.decoder.up_blocks), hidden)
            with probe:
                inflated = work.decode(z).sample
            stream, hid = fit_rescale(work, probe.peaks, 1000.0)
            rescale_decoder(work, stream, hid)
            back = work.decode(z).sample
            print(f"{name:<9} {size:>5} {t32:>8.3f} {t16:>8.3f} {t16 / t32:>9.2f} {te:>10.3f} {te / t32:>8.2f} "
                  f"{peak_err:>12.2e} {_rel(inflated, ref):>12.2e} {_rel(back, ref):>10.2e}", flush=True)


if __name__ == "__main__":
    main()
