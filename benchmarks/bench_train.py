"""Forward+backward cost of every loss relative to ``dice_ce``, and training throughput.

    make bench-train        # or: .venv/bin/python -m benchmarks.bench_train --dim 2d

On one fixed batch (seeded random images; a sphere of tumour as target) and in one run:

- ``loss only``: ``loss(logits, target).backward()`` on fixed logits;
- ``step``: U-Net forward (with autocast on CUDA) + loss + backward, the cost that
  decides training time; the aim for the manifest loss is <= 1.2x ``dice_ce``.

Losses are timed in interleaved rounds (every loss once per round, medians over rounds),
so a busy machine slows them alike. The boundary loss gets its distance map precomputed,
as the data loader does. The manifest loss is the one of ``--manifest`` if given, else a
representative one (adaptive Tversky + focal + Barron, SoftAdapt weighting). Then
``--steps`` full training steps (AdamW) with the manifest loss give voxels/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline.train.loop import amp_mode, needs_distance_map, select_device
from pipeline.train.losses import LOSSES, build_loss, signed_distance_map
from pipeline.train.models import build_unet

DEFAULT_MANIFEST_SPEC: dict[str, Any] = {
    "name": "manifest",
    "terms": [{"name": "adaptive_tversky", "weight": 1.0, "params": {"A": 0.3, "B": 0.4}},
              {"name": "focal", "weight": 1.0, "params": {"gamma": 2.0}},
              {"name": "barron", "weight": 0.5, "params": {"alpha": 1.0, "scale": 0.1}}],
    "weighting": {"method": "softadapt", "params": {"beta": 0.1}},
}


def fixed_batch(dim: str, batch: int, size: int, channels: int = 4, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images ``(N, C, *spatial)`` and a binary sphere target ``(N, 1, *spatial)``."""
    g = torch.Generator().manual_seed(seed)
    spatial = (size, size) if dim == "2d" else (size, size, size)
    x = torch.randn((batch, channels, *spatial), generator=g)
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in spatial),
                           indexing="ij")
    r2 = sum((gr - (s - 1) / 2) ** 2 for gr, s in zip(grids, spatial, strict=True))
    y = (r2 < (size / 5) ** 2).float().expand(batch, 1, *spatial).contiguous()
    return x, y


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", choices=("2d", "3d"), default="2d")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2d) / 2 (3d)")
    parser.add_argument("--size", type=int, default=None, help="default 128 (2d) / 64 (3d)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--manifest", default=None, help="take the manifest loss from here")
    parser.add_argument("--losses", default=None, help="comma-separated; default: all")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    amp = amp_mode(device, "auto")
    batch = args.batch or (8 if args.dim == "2d" else 2)
    size = args.size or (128 if args.dim == "2d" else 64)
    x, y = fixed_batch(args.dim, batch, size)
    x, y = x.to(device), y.to(device)
    dmap = signed_distance_map(y).to(device)
    manifest_spec = DEFAULT_MANIFEST_SPEC
    if args.manifest:
        from pipeline.manifest_io import load_manifest

        manifest_spec = load_manifest(args.manifest).loss_spec()
    names = args.losses.split(",") if args.losses else sorted(LOSSES)
    if "dice_ce" not in names:
        names = ["dice_ce", *names]
    specs = {n: (dict(manifest_spec) if n == "manifest" else {"name": n}) for n in names}
    losses = {n: build_loss(s).to(device).train() for n, s in specs.items()}
    torch.manual_seed(0)
    model = build_unet(args.dim, x.shape[1], 1, features=32, levels=4).to(device).train()
    fixed_logits = model(x).detach().float()

    def loss_only(name: str) -> Callable[[], None]:
        fn = losses[name]
        extras = {"distance_map": dmap} if needs_distance_map(fn) else {}

        def run() -> None:
            logits = fixed_logits.clone().requires_grad_(True)
            fn(logits, y, **extras).backward()
        return run

    def step(name: str) -> Callable[[], None]:
        fn = losses[name]
        extras = {"distance_map": dmap} if needs_distance_map(fn) else {}

        def run() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp.dtype or torch.float32,
                                enabled=amp.dtype is not None):
                logits = model(x)
            fn(logits.float(), y, **extras).backward()
        return run

    for name in names:  # warm-up (allocations, cuDNN choices, MONAI caches)
        loss_only(name)()
        step(name)()
    times: dict[str, dict[str, list[float]]] = {n: {"loss": [], "step": []} for n in names}
    for _ in range(args.rounds):
        for name in names:
            times[name]["loss"].append(_timed(loss_only(name), device))
            times[name]["step"].append(_timed(step(name), device))
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    base = med["dice_ce"]

    # throughput: real training steps with the manifest loss (or dice_ce)
    train_name = "manifest" if "manifest" in losses else "dice_ce"
    opt = torch.optim.AdamW(list(model.parameters()) + list(losses[train_name].parameters()),
                            lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp.scaler)
    run = step(train_name)

    def train_steps() -> None:
        for _ in range(args.steps):
            run()
            scaler.step(opt) if amp.scaler else opt.step()
            if amp.scaler:
                scaler.update()
    seconds = _timed(train_steps, device)
    voxels = x.numel() // x.shape[1] * args.steps

    console = Console()
    spatial = "x".join(str(s) for s in x.shape[2:])
    table = Table(title=f"fwd+bwd per loss on a fixed {args.dim} batch {batch}x{x.shape[1]}x"
                        f"{spatial}, {device}, amp {amp.name}; median of {args.rounds} rounds")
    for col in ("loss", "loss only (ms)", "ratio", "U-Net step (ms)", "ratio"):
        table.add_column(col, justify="right" if col != "loss" else "left")
    for name in names:
        m = med[name]
        table.add_row(name, f"{m['loss'] * 1e3:.2f}", f"{m['loss'] / base['loss']:.2f}x",
                      f"{m['step'] * 1e3:.1f}", f"{m['step'] / base['step']:.2f}x")
    console.print(table)
    if "manifest" in med:
        ratio = med["manifest"]["step"] / base["step"]
        verdict = "meets" if ratio <= 1.2 else "misses"
        console.print(f"manifest loss: {ratio:.2f}x dice_ce per training step ({verdict} the "
                      f"<= 1.2x aim); loss alone {med['manifest']['loss'] / base['loss']:.2f}x",
                      highlight=False)
    console.print(f"training throughput ({train_name}, {args.steps} AdamW steps, {device}, "
                  f"amp {amp.name}): {voxels / seconds:,.0f} voxels/s", highlight=False)


if __name__ == "__main__":
    main()
