"""User-style HTAF models, written in plain PyTorch the way people write them (not the registered samples).

Every model takes digits-shaped input (1x8x8 images or 64-vectors; ``two_inputs`` also takes a 4-vector),
has at most a few thousand parameters, and deliberately has *no* ``input_shape`` attribute.

    REGISTRY[name] = (constructor, per-sample input shapes)      # shapes: a tuple of shapes, one per input
    model = REGISTRY[name][0]();  train(model, steps=300)

Import this module as ``tests.gallery.models`` (``PYTHONPATH=/work/main``) so that pickles of these
models can be loaded back by another process.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from htaf_export.nn import HTAF

# ---------------------------------------------------------------------------------------------------
# 1. MLP, two HTAF layers of different widths, thresholds and tie rules (smooth mode)


class TwoTieMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, 37)
        self.gate_wide = HTAF(alpha=3.0, beta=5.0, threshold=0.25, levels="01", mode="smooth", tie="ge")
        self.narrow = nn.Linear(37, 19)
        self.gate_narrow = HTAF(alpha=2.0, beta=6.0, threshold=-0.1, levels="01", mode="smooth", tie="gt")
        self.classifier = nn.Linear(19, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_wide(self.encoder(x))
        h = self.gate_narrow(self.narrow(h))
        return self.classifier(h)


# ---------------------------------------------------------------------------------------------------
# 2. Binary CNN with a hand-written binary conv (STE sign of a latent weight, inline in forward)


class SignConv2d(nn.Module):
    """Latent real weights, binarized inline: w + (sign(w) − w).detach()."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.pad = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.latent
        wb = w + (torch.sign(w) - w).detach()
        return F.conv2d(x, wb, padding=self.pad)


class HandBinaryCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(12)
        self.sign_in = HTAF(alpha=2.0, beta=4.0, levels="pm1")
        self.bconv = SignConv2d(12, 12, 3, padding=1)
        self.bconv_norm = nn.BatchNorm2d(12)
        self.sign_res = HTAF(alpha=2.0, beta=4.0, levels="pm1")
        self.shrink = nn.MaxPool2d(2)
        self.bconv2 = SignConv2d(12, 20, 3)
        self.bconv2_norm = nn.BatchNorm2d(20)
        self.sign_out = HTAF(alpha=2.5, beta=3.0, levels="pm1")
        self.fc = nn.Linear(20 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem_norm(self.stem(x))
        a = self.sign_in(skip)
        h = self.sign_res(self.bconv_norm(self.bconv(a)) + skip)  # residual add before a step
        h = self.shrink(h)  # 8x8 -> 4x4
        h = self.sign_out(self.bconv2_norm(self.bconv2(h)))  # 4x4 -> 2x2
        return self.fc(h.flatten(1))


# ---------------------------------------------------------------------------------------------------
# 3. Weights binarized with torch.where inside forward, F.linear layers


class WhereLinear(nn.Module):
    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(fout, fin).uniform_(-0.5, 0.5))
        self.b = nn.Parameter(torch.zeros(fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wb = torch.where(self.w >= 0, 1.0, -1.0)
        wb = self.w + (wb - self.w).detach()
        return F.linear(x, wb, self.b)


class WhereBinaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_a = WhereLinear(64, 44)
        self.norm_a = nn.BatchNorm1d(44)
        self.sgn_a = HTAF(alpha=2.0, beta=4.0, levels="pm1", tie="ge")
        self.fc_b = WhereLinear(44, 28)
        self.norm_b = nn.BatchNorm1d(28)
        self.sgn_b = HTAF(alpha=2.0, beta=4.0, levels="pm1", tie="ge")
        self.logits = nn.Linear(28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sgn_a(self.norm_a(self.fc_a(x)))
        h = self.sgn_b(self.norm_b(self.fc_b(h)))
        return self.logits(h)


# ---------------------------------------------------------------------------------------------------
# 4. Bi-Real-Net style: sign(W)·mean|W| per output channel (STE), real shortcut with AvgPool2d downsampling


class ScaledSignConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        wb = w + (alpha * torch.sign(w) - w).detach()
        return F.conv2d(x, wb, stride=self.stride, padding=1)  # zero padding, as Bi-Real does


class BiRealBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.binarize = HTAF(alpha=2.0, beta=4.0, levels="pm1")
        self.conv = ScaledSignConv(cin, cout, stride)
        self.norm = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.down = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.binarize(x))) + self.down(x)


class BiRealNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn_in = nn.BatchNorm2d(8)
        self.stage1 = BiRealBlock(8, 8, 1)
        self.stage2 = BiRealBlock(8, 14, 2)  # 8x8 -> 4x4
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_in(self.conv_in(x))
        h = self.stage2(self.stage1(h))
        return self.fc(torch.flatten(self.gap(h), 1))


# ---------------------------------------------------------------------------------------------------
# 5. Spiking net as a plain Python loop over T steps (hand-written LIF, subtract reset, surrogate HTAF)


class LoopSNN(nn.Module):
    def __init__(self, T: int = 6, decay: float = 0.85, v_th: float = 1.0) -> None:
        super().__init__()
        self.T, self.decay, self.v_th = T, decay, v_th
        self.w_in = nn.Linear(64, 41)
        self.spike1 = HTAF(alpha=2.0, beta=4.0, mode="surrogate")
        self.w_hid = nn.Linear(41, 23)
        self.spike2 = HTAF(alpha=2.0, beta=4.0, mode="surrogate")
        self.readout = nn.Linear(23, 10)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.reshape(img.shape[0], -1)
        current = self.w_in(x)  # direct coding: the same input current at every step
        v1 = torch.zeros_like(current)
        v2 = torch.zeros(x.shape[0], 23)
        vo = torch.zeros(x.shape[0], 10)
        total = torch.zeros(x.shape[0], 10)
        for _ in range(self.T):
            v1 = self.decay * v1 + current
            s1 = self.spike1(v1 - self.v_th)
            v1 = v1 - s1 * self.v_th
            v2 = self.decay * v2 + self.w_hid(s1)
            s2 = self.spike2(v2 - self.v_th)
            v2 = v2 - s2 * self.v_th
            vo = self.decay * vo + self.readout(s2)
            total = total + vo
        return total / self.T  # mean membrane of the readout


# ---------------------------------------------------------------------------------------------------
# 6. Concept bottleneck returning a dict


class ConceptNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(6, 10, 3), nn.ReLU(),  # 4 -> 2
        )
        self.to_concepts = nn.Linear(40, 14)
        self.concept_norm = nn.BatchNorm1d(14)
        self.concept_gate = HTAF(alpha=1.5, beta=5.0, levels="01")
        self.classifier = nn.Linear(14, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.concept_gate(self.concept_norm(self.to_concepts(self.trunk(x).flatten(1))))
        return {"logits": self.classifier(c), "concepts": c}


# ---------------------------------------------------------------------------------------------------
# 7. Nested outputs: (logits, [h1, h2])


class NestedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 30)
        self.bits = HTAF(alpha=2.0, beta=4.0, threshold=0.1, levels="01")
        self.mix = nn.Linear(30, 18)
        self.signs = HTAF(alpha=2.0, beta=4.0, levels="pm1", tie="gt")
        self.out = nn.Linear(18, 10)

    def forward(self, x: torch.Tensor):
        x = x.view(x.size(0), -1)
        h1 = self.bits(self.proj(x))
        h2 = self.signs(self.mix(h1))
        return self.out(h2), [h1, h2]


# ---------------------------------------------------------------------------------------------------
# 8. Zero-padded convs, torch.cat of two branches, flatten, HTAF steps


class PadCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch3 = nn.Conv2d(1, 5, 3, padding=1)
        self.fire3 = HTAF(alpha=2.0, beta=4.0, threshold=0.05, levels="01")
        self.branch5 = nn.Conv2d(1, 3, 5, padding=2, padding_mode="zeros")
        self.fire5 = HTAF(alpha=2.0, beta=4.0, levels="01", tie="gt")
        self.merge = nn.Conv2d(8, 6, 3, stride=2, padding=1)  # 8 -> 4, zero padding at stride 2
        self.merge_norm = nn.BatchNorm2d(6)
        self.merge_sign = HTAF(alpha=2.0, beta=4.0, levels="pm1")
        self.dense = nn.Linear(6 * 4 * 4, 20)
        self.dense_fire = HTAF(alpha=3.0, beta=3.0, threshold=-0.2, levels="01")
        self.head = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.fire3(self.branch3(x)), self.fire5(self.branch5(x))], dim=1)
        h = self.merge_sign(self.merge_norm(self.merge(both)))
        h = torch.flatten(h, start_dim=1)
        return self.head(self.dense_fire(self.dense(h)))


# ---------------------------------------------------------------------------------------------------
# 9. Two inputs: an image and a 4-vector


class ImagePlusMeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_conv = nn.Conv2d(1, 4, 3)  # 8 -> 6
        self.img_fire = HTAF(alpha=2.0, beta=4.0, levels="01")
        self.img_fc = nn.Linear(4 * 6 * 6, 16)
        self.meta_fc = nn.Linear(4, 8)
        self.meta_sign = HTAF(alpha=2.0, beta=4.0, levels="pm1")
        self.fuse = nn.Linear(24, 10)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        a = self.img_fc(self.img_fire(self.img_conv(image)).flatten(1))
        b = self.meta_sign(self.meta_fc(extra))
        return self.fuse(torch.cat([a, b], dim=1))


# ---------------------------------------------------------------------------------------------------
# 10. A hand-written step as a custom autograd.Function (no HTAF module at all; HTAF gradient by hand)


class HeavisideHTAFGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):  # type: ignore[override]
        ctx.save_for_backward(u)
        return (u > 0).float()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(2.0 * u + 4.0 * torch.tanh(u))
        return g * s * (1 - s) * (2.0 + 4.0 * (1 - torch.tanh(u) ** 2))


class CustomStepDHN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(64, 33)
        self.l2 = nn.Linear(33, 21)
        self.l3 = nn.Linear(21, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = HeavisideHTAFGrad.apply(self.l1(x) - 0.3)
        h = HeavisideHTAFGrad.apply(self.l2(h))
        return self.l3(h)


# ---------------------------------------------------------------------------------------------------
# 11. Convolutional spiking net, plain loop, zero reset written two ways (multiply and torch.where)


class ConvSNN(nn.Module):
    def __init__(self, steps: int = 5) -> None:
        super().__init__()
        self.steps = steps
        self.encoder = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.spk1 = HTAF(alpha=2.0, beta=4.0, threshold=0.5, levels="01", mode="surrogate")
        self.hidden = nn.Linear(6 * 4 * 4, 24)
        self.spk2 = HTAF(alpha=2.0, beta=4.0, threshold=0.75, levels="01", mode="surrogate", tie="gt")
        self.classifier = nn.Linear(24, 10)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        drive = self.encoder(img)
        mem1 = torch.zeros_like(drive)
        mem2 = torch.zeros(img.shape[0], 24)
        logits = torch.zeros(img.shape[0], 10)
        for _ in range(self.steps):
            mem1 = 0.75 * mem1 + drive
            s1 = self.spk1(mem1)
            mem1 = mem1 * (1.0 - s1)
            mem2 = 0.5 * mem2 + self.hidden(torch.flatten(self.pool(s1), 1))
            s2 = self.spk2(mem2)
            mem2 = torch.where(s2 > 0, torch.zeros_like(mem2), mem2)
            logits = logits + self.classifier(s2)
        return logits / self.steps


# ---------------------------------------------------------------------------------------------------

IMG = (1, 8, 8)
VEC = (64,)

REGISTRY: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[int, ...], ...]]] = {
    "mlp_two_ties": (TwoTieMLP, (VEC,)),
    "binary_cnn_handwritten": (HandBinaryCNN, (IMG,)),
    "binary_where_weights": (WhereBinaryNet, (VEC,)),
    "bireal_style": (BiRealNet, (IMG,)),
    "snn_plain_loop": (LoopSNN, (IMG,)),
    "icbm_dict": (ConceptNet, (IMG,)),
    "nested_outputs": (NestedOut, (IMG,)),
    "zero_pad_concat": (PadCat, (IMG,)),
    "two_inputs": (ImagePlusMeta, (IMG, (4,))),
    "custom_step_fn": (CustomStepDHN, (VEC,)),
    "conv_snn_zero_reset": (ConvSNN, (IMG,)),
}


def shapes_of(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    for ctor, shapes in REGISTRY.values():
        if type(model) is ctor:
            return shapes
    raise KeyError(f"{type(model).__name__} is not in the gallery")


def quadrant_means(x: np.ndarray) -> np.ndarray:
    """The 4-vector input of ``two_inputs``: mean ink of each 4x4 quadrant of the 8x8 digit."""
    img = x.reshape(len(x), 8, 8)
    q = [img[:, :4, :4], img[:, :4, 4:], img[:, 4:, :4], img[:, 4:, 4:]]
    return np.stack([a.mean(axis=(1, 2)) for a in q], axis=1).astype(np.float32)


def digits_inputs(shapes, split: str = "train") -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Digits (pixels / 16) shaped for a model's inputs, with labels; fixed split (seed 0, 25% test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    inputs = [x.reshape(len(x), *shapes[0])]
    if len(shapes) > 1:
        inputs.append(quadrant_means(x))
    return tuple(inputs), y


def logits_of(out) -> torch.Tensor:
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def train(model: nn.Module, steps: int = 300, lr: float = 3e-3, batch: int = 64, seed: int = 0) -> float:
    """A few seconds of Adam on the digits train split; returns test accuracy (smooth model, eval mode)."""
    torch.manual_seed(seed)
    shapes = shapes_of(model)
    xs, y = digits_inputs(shapes, "train")
    xs_t = [torch.from_numpy(a) for a in xs]
    y_t = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y_t), (batch,), generator=gen)
        loss = F.cross_entropy(logits_of(model(*[a[idx] for a in xs_t])), y_t[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xs, y = digits_inputs(shapes, "test")
    with torch.no_grad():
        pred = logits_of(model(*[torch.from_numpy(a) for a in xs])).argmax(1).numpy()
    return float((pred == y).mean())


def build(name: str, trained: bool = True, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = REGISTRY[name][0]()
    if trained:
        train(model, steps=steps)
    return model.eval()
