"""Training losses as modules ``loss(outputs: dict, batch: dict) -> Tensor``.

Built by name from configs (:func:`build_loss`, registry :data:`LOSSES`). Model outputs
are dicts (the trainer wraps tensors as ``{"logits": t}`` / ``{"sr": t}``; a VQ-VAE returns
``reconstruction`` and ``commitment_loss``). :class:`TranslationalConsistencyLoss` is the
exception: it runs the model itself (``needs_model = True``), see its docstring.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

__all__ = [
    "LOSSES",
    "register_loss",
    "build_loss",
    "CrossEntropyLoss",
    "L1Loss",
    "MSELoss",
    "VQCommitmentLoss",
    "TranslationalConsistencyLoss",
]

#: name -> loss class; ``build_loss(name, **options)`` instantiates it.
LOSSES = Registry("loss")

# prediction key in outputs -> target key in batch, for the image losses
_IMAGE_PAIRS = (("sr", "hr"), ("reconstruction", "image"))


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: register the loss class under ``name``."""
    return LOSSES.register(name)


def build_loss(name: str, **options: Any) -> nn.Module:
    """The loss ``name`` with its options (e.g. ``build_loss('cross_entropy', label_smoothing=0.1)``)."""
    return LOSSES.build(name, **options)


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"weight must be a number >= 0, got {weight!r}")
    return float(weight)


def _get(mapping: Mapping[str, Any], key: str, what: str) -> torch.Tensor:
    if key not in mapping:
        raise KeyError(f"{what} has no {key!r} (keys: {sorted(mapping)})")
    return mapping[key]


@register_loss("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Cross-entropy of ``outputs["logits"]`` against ``batch["label"]``, with label smoothing."""

    needs_model = False

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.weight = _check_weight(weight)

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        logits = _get(outputs, "logits", "outputs")
        labels = _get(batch, "label", "batch")
        return self.weight * F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


class _ImageLoss(nn.Module):
    """A pixel loss between a predicted image and its target. Keys default to the first
    pair present: ``outputs["sr"]`` vs ``batch["hr"]``, ``outputs["reconstruction"]`` vs
    ``batch["image"]``."""

    needs_model = False

    def __init__(self, weight: float = 1.0, prediction: str | None = None, target: str | None = None) -> None:
        super().__init__()
        self.weight = _check_weight(weight)
        self.prediction = prediction
        self.target = target

    def _pair(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prediction is not None:
            pred_key = self.prediction
            target_key = self.target or dict(_IMAGE_PAIRS).get(pred_key, "")
        else:
            found = [(p, t) for p, t in _IMAGE_PAIRS if p in outputs]
            if not found:
                raise KeyError(f"outputs have none of {[p for p, _ in _IMAGE_PAIRS]} (keys: {sorted(outputs)}); set prediction=...")
            pred_key, target_key = found[0]
            target_key = self.target or target_key
        pred = _get(outputs, pred_key, "outputs")
        target = _get(batch, target_key, "batch")
        if pred.shape != target.shape:
            raise ValueError(f"outputs[{pred_key!r}] has shape {tuple(pred.shape)} but batch[{target_key!r}] has {tuple(target.shape)}")
        return pred.float(), target.float()


@register_loss("l1")
class L1Loss(_ImageLoss):
    """Mean absolute error (the usual SR training loss)."""

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        pred, target = self._pair(outputs, batch)
        return self.weight * F.l1_loss(pred, target)


@register_loss("mse")
class MSELoss(_ImageLoss):
    """Mean squared error (VQ-VAE reconstruction, PSNR-oriented SR)."""

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        pred, target = self._pair(outputs, batch)
        return self.weight * F.mse_loss(pred, target)


@register_loss("vq_commitment")
class VQCommitmentLoss(nn.Module):
    """``weight * outputs["commitment_loss"]``: the VQ-VAE's own codebook/commitment term
    (the model computes it, with its beta; this only adds it to the total)."""

    needs_model = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = _check_weight(weight)

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        value = _get(outputs, "commitment_loss", "outputs")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"outputs['commitment_loss'] must be a scalar tensor, got {value!r}")
        return self.weight * value.reshape(())


@register_loss("translational_consistency")
class TranslationalConsistencyLoss(nn.Module):
    """Penalise SR outputs that change when the input is shifted.

    Why: the claim behind switched convolutions is that routing follows local image content,
    so the expert chosen for a pixel (and hence the output there) should not depend on where
    that pixel sits inside the patch. A network that routes by position, or by border
    context, gives different answers for the same pixels in different crops; this loss makes
    that visible and trains it away.

    How: take the LR patch ``batch["lr"]`` ``(N, C, h, w)`` and its four corner crops of size
    ``(h - shift, w - shift)``; run the model on two different corners drawn at random (one
    pair per batch); L1 between the two outputs on the region common to all four corners
    (input rows/cols ``[shift, h - shift)`` and ``[shift, w - shift)``, in output pixels times
    ``scale = out_h / crop_h``). ``shift`` defaults to ``min(h, w) // 4`` and must keep the
    common region non-empty (``2 * shift < min(h, w)``, so each crop keeps over half the
    patch). Returns 0 (no model call) before ``start_step``.

    Call ``loss(model, batch, step, generator=None) -> Tensor`` (it runs the model twice,
    with gradients through both runs); ``needs_model = True`` tells the trainer so.
    """

    needs_model = True

    def __init__(self, start_step: int = 0, weight: float = 1.0, shift: int | None = None, key: str = "lr") -> None:
        super().__init__()
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int) or shift < 1):
            raise ValueError(f"shift must be None or an int >= 1, got {shift!r}")
        self.start_step = start_step
        self.weight = _check_weight(weight)
        self.shift = shift
        self.key = key

    @staticmethod
    def corners(shift: int) -> list[tuple[int, int]]:
        """Top-left offsets of the four corner crops: TL, TR, BL, BR."""
        return [(0, 0), (0, shift), (shift, 0), (shift, shift)]

    def forward(self, model: Callable[[torch.Tensor], Any], batch: Mapping[str, Any], step: int, generator: torch.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        lr = _get(batch, self.key, "batch")
        if not isinstance(lr, torch.Tensor) or lr.dim() != 4:
            raise ValueError(f"batch[{self.key!r}] must be an (N, C, h, w) tensor, got {getattr(lr, 'shape', type(lr))}")
        if step < self.start_step:
            return lr.new_zeros((), dtype=torch.float32)
        h, w = lr.shape[-2:]
        shift = self.shift if self.shift is not None else min(h, w) // 4
        if shift < 1 or 2 * shift >= min(h, w):
            raise ValueError(f"shift must satisfy 1 <= shift < min(h, w) / 2 = {min(h, w) / 2} for patches of {h}x{w}, got {shift}")
        first = int(torch.randint(4, (1,), generator=generator).item())
        second = (first + 1 + int(torch.randint(3, (1,), generator=generator).item())) % 4
        ch, cw = h - shift, w - shift
        outs = []
        for corner in (first, second):
            oy, ox = self.corners(shift)[corner]
            out = model(lr[..., oy : oy + ch, ox : ox + cw])
            if isinstance(out, Mapping):
                out = _get(out, "sr", "model outputs")
            outs.append((out, oy, ox))
        out_h, out_w = outs[0][0].shape[-2:]
        if out_h % ch or out_w % cw or out_h // ch != out_w // cw:
            raise ValueError(f"model output {out_h}x{out_w} is not an integer multiple of its input {ch}x{cw}")
        s = out_h // ch
        common_h, common_w = (h - 2 * shift) * s, (w - 2 * shift) * s
        regions = [out[..., (shift - oy) * s : (shift - oy) * s + common_h, (shift - ox) * s : (shift - ox) * s + common_w] for out, oy, ox in outs]
        return self.weight * F.l1_loss(regions[0].float(), regions[1].float())
