"""Pictures of routing: selector maps beside their inputs, and expert-usage bar charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .insight import selector_maps


def _expert_colours(breadth: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if breadth <= 10 else "tab20" if breadth <= 20 else "turbo"]
    if breadth <= 20:
        return np.asarray([cmap(i)[:3] for i in range(breadth)])
    return np.asarray([cmap(i / max(breadth - 1, 1))[:3] for i in range(breadth)])


def selector_map_image(selection: torch.Tensor, breadth: int) -> torch.Tensor:
    """``(H, W)`` expert indices -> ``(3, H, W)`` float colours in [0, 1], the colours of
    :func:`save_selector_maps` (TensorBoard's selector images)."""
    colours = torch.as_tensor(_expert_colours(breadth), dtype=torch.float32)
    return colours[selection.long().cpu()].permute(2, 0, 1)


def display_tensor(image: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` -> ``(3, H, W)`` in [0, 1], rescaled per image (inputs are often
    normalised; one channel is repeated)."""
    img = image.detach().float().cpu()
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo).clamp_min(1e-8)


def _display_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1], rescaled per image (inputs are often normalised)."""
    return display_tensor(image).permute(1, 2, 0).numpy()


def save_selector_maps(model: nn.Module, images: torch.Tensor, out_dir: str | Path, *, max_images: int = 8) -> list[Path]:
    """Write, per switched layer, one PNG per image (the image beside its selector map, one
    colour per expert) and a usage bar chart. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got {getattr(images, 'shape', type(images))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = images[:max_images]
    maps = selector_maps(model, images)
    breadths = {name: m.breadth for name, m in model.named_modules() if name in maps}
    written: list[Path] = []
    for name, selection in maps.items():
        breadth = breadths[name]
        colours = _expert_colours(breadth)
        safe = name.replace(".", "_") or "layer"
        for i in range(selection.shape[0]):
            fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
            axes[0].imshow(_display_image(images[i]))
            axes[0].set_title("input")
            axes[1].imshow(colours[selection[i].cpu().numpy()], interpolation="nearest")
            axes[1].set_title(f"{name or 'layer'}: expert per pixel")
            for ax in axes:
                ax.axis("off")
            used = sorted(set(selection[i].flatten().tolist()))
            fig.legend(handles=[Patch(color=colours[e], label=str(e)) for e in used], loc="lower center",
                       ncol=min(len(used), 8), fontsize=7, frameon=False)
            fig.tight_layout(rect=(0, 0.08, 1, 1))
            path = out / f"{safe}_image{i}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
        counts = torch.bincount(selection.flatten().cpu(), minlength=breadth).double()
        fractions = (counts / counts.sum()).numpy()
        fig, ax = plt.subplots(figsize=(max(3, 0.35 * breadth + 1.5), 2.5), dpi=100)
        ax.bar(range(breadth), fractions, color=colours)
        ax.axhline(1 / breadth, color="k", lw=0.8, ls="--", label="uniform")
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction of pixels")
        ax.set_title(f"{name or 'layer'} usage")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{safe}_usage.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
