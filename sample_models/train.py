"""Retrain the bundled sample models on sklearn's digits and write their checkpoints and MODELS.md.

    python sample_models/train.py            # all six, a few minutes on 2 cores
    python sample_models/train.py bnn_mlp    # one (by checkpoint name)

Every run is seeded, so it reproduces the committed checkpoints on the same torch build.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import htaf_export
from htaf_export import data, models
from htaf_export.harden import accuracy, harden, primary_output
from htaf_export.nn import HTAF

HERE = Path(__file__).resolve().parent


@dataclass
class Recipe:
    arch: str
    config: dict
    epochs: int
    lr: float
    # Smooth HTAF sites are sharpened over training (alpha grows geometrically to alpha_end),
    # which shrinks the hardening gap; surrogate sites are exact in the forward pass already.
    alpha_end: float | None = None
    name: str = ""  # the checkpoint's name when it is not the architecture's

    @property
    def file(self) -> str:
        return self.name or self.arch


RECIPES = [
    Recipe("bnn_mlp", dict(hidden=[256, 256]), epochs=40, lr=3e-3),
    Recipe("bnn_cnn", dict(channels=[32, 64, 64]), epochs=30, lr=3e-3),
    Recipe("dhn_mlp", dict(hidden=[256, 128], mode="smooth", alpha=1.0, beta=4.0), epochs=60, lr=2e-3, alpha_end=30.0),
    Recipe("snn_mlp", dict(hidden=[128, 128], steps=8), epochs=40, lr=2e-3),
    # the same spiking MLP with a zero reset: the one a NIR LIF expresses exactly (--target nir)
    Recipe("snn_mlp", dict(hidden=[128, 128], steps=8, reset="zero"), epochs=40, lr=2e-3, name="snn_zero_mlp"),
    Recipe("icbm_cnn", dict(channels=[16, 32], concepts=32, mode="smooth", alpha=1.0, beta=4.0), epochs=60,
           lr=2e-3, alpha_end=30.0),
]


def train(recipe: Recipe, seed: int = 0, batch_size: int = 64) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = models.build(recipe.arch, recipe.config)
    shape = model.input_shape
    tr, te = data.digits("train", shape), data.digits("test", shape)
    x_tr, y_tr = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    x_te, y_te = torch.from_numpy(te.x), torch.from_numpy(te.y)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs)
    sites = [m for m in model.modules() if isinstance(m, HTAF) and m.mode == "smooth"]
    alpha0 = {id(m): m.alpha for m in sites}
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(recipe.epochs):
        if recipe.alpha_end is not None:
            frac = epoch / max(recipe.epochs - 1, 1)
            for m in sites:
                m.alpha = alpha0[id(m)] * (recipe.alpha_end / alpha0[id(m)]) ** frac
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(batch_size):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss = loss_fn(primary_output(model(x_tr[idx])), y_tr[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    result = harden(model, torch.from_numpy(te.x), torch.from_numpy(te.y))
    unsat = sum(g.unsaturated for g in result.gaps) / max(sum(g.count for g in result.gaps), 1)
    stats = {
        "train_accuracy": accuracy(model, x_tr, y_tr),
        "smooth_accuracy": result.smooth_accuracy,
        "hardened_accuracy": result.hardened_accuracy,
        "unsaturated": unsat,
        "smooth_sites": len(sites),
        "test_samples": len(x_te),
    }
    return model, stats


def unsaturated(row: dict) -> str:
    return f"{row['unsaturated']:.2%}" if row["smooth_sites"] else "none (surrogate: exact forward)"


def write_table(rows: dict[str, dict]) -> None:
    lines = [
        "# Sample models",
        "",
        "Trained by `python sample_models/train.py` on `sklearn.datasets.load_digits` (1,797 8x8 digits), "
        f"stratified split, {int(data.DIGITS_TEST_FRACTION * 100)} % held out (seed {data.DIGITS_SEED}). "
        "*As trained* is the model's own forward pass (smooth HTAF, or the exact step for sites trained "
        "in surrogate mode); *hardened* replaces every site by its exact step. *Unsaturated* is the share "
        "of test pre-activations where |HTAF − step| > 0.01 at the smooth sites; models trained in surrogate "
        "mode already run the exact step forward, so they have no hardening gap.",
        "",
        "| model | family | parameters | as trained (test) | hardened (test) | unsaturated | train time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| `{name}.pt` | {r['family']} | {r['params']:,} | {r['smooth_accuracy']:.2%} | "
                     f"{r['hardened_accuracy']:.2%} | {unsaturated(r)} | {r['seconds']:.0f} s |")
    (HERE / "MODELS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="checkpoints to train, by name (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    chosen = [r for r in RECIPES if not args.names or r.file in args.names]
    rows = {}
    for recipe in chosen:
        start = time.perf_counter()
        model, stats = train(recipe)
        seconds = time.perf_counter() - start
        htaf_export.save(model, HERE / f"{recipe.file}.pt", meta={"trained_on": "sklearn digits", **stats})
        rows[recipe.file] = {**stats, "family": model.family, "seconds": seconds,
                             "params": sum(p.numel() for p in model.parameters())}
        print(f"{recipe.file}: as trained {stats['smooth_accuracy']:.2%}, hardened {stats['hardened_accuracy']:.2%}, "
              f"unsaturated {stats['unsaturated']:.2%}, {seconds:.0f} s", flush=True)
    if not args.names:
        write_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
