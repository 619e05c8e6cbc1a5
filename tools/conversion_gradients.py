"""Does a staged conversion leave the network's gradients as they were?

Right after ``convert`` (every expert a copy of the kernel) a switched net computes the plain
net's function. Its parameters' gradients on the same batch should then be the plain net's
too (an expert tensor summed over its experts). With hard routing they are not unless the
selectors read a detached input: the gate is 1 in forward but carries ``grad / p`` back into
the selector, and through it into the layer's input and everything before it. This prints, for
every parameter, ``max |g_converted - g_plain| / max |g_plain|`` on one training batch, for the
original rule and for ``detach_selector_input=True``.

    python tools/conversion_gradients.py ~/studies/vqvae-cpu/branch_points/cifar10/pretrain/seed0/step_00005250 \
        --include encoder.conv2 encoder.conv3 'encoder.residual.layers.*.conv1' \
                  'decoder.residual.layers.*.conv1' decoder.upsample1.conv decoder.upsample2.conv \
        --breadth 8 --selector lambda_then_conv1x1

The model runs in training mode (as in a training step; a VQ-VAE's EMA codebook update is
applied to a copy per pass, so every pass sees the same codebook).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def gradients(model: torch.nn.Module, batch: dict, forward, loss) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    total, _ = loss(forward(model, batch), batch, model)
    total.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare(checkpoint: Path, include: list[str], breadth: int, selector: str, batch_size: int, seed: int) -> dict:
    from dynconv.convert import convert
    from dynconv.train.experiment import (build_loss_terms, build_split, check_config, combine_loss_terms,
                                          load_checkpoint_model)
    from dynconv.train.tasks import TASKS

    torch.manual_seed(seed)
    plain, config, _ = load_checkpoint_model(checkpoint)
    spec = TASKS[check_config(config, training=False)]
    dataset = build_split(config, config.data.train_split, config.data.train_options)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(batch_size)])
    terms = build_loss_terms(config, torch.device("cpu"))

    def forward(model, batch):
        return spec.wrap(model(batch[spec.input]))

    def loss(outputs, batch, model):
        return combine_loss_terms(terms, outputs, batch, model, step=0)

    reference = gradients(copy.deepcopy(plain), batch, forward, loss)
    result: dict[str, dict[str, float]] = {}
    for detach in (False, True):
        model = copy.deepcopy(plain)
        converted = convert(model, to="switched", include=include, breadth=breadth, selector=selector,
                            routing="hard", detach_selector_input=detach)
        grads = gradients(model, batch, forward, loss)
        errors = {}
        for name, g_plain in reference.items():
            g = grads[name]
            if g.dim() == g_plain.dim() + 1:  # experts: their gradients add up to the kernel's
                g = g.sum(0)
            errors[name] = float((g - g_plain).abs().max() / g_plain.abs().max().clamp_min(1e-30))
        result["detached" if detach else "original"] = errors
    result["converted"] = list(converted)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (or a run directory: its latest)")
    parser.add_argument("--include", nargs="+", required=True, help="the convs to convert (convert's patterns)")
    parser.add_argument("--breadth", type=int, default=8)
    parser.add_argument("--selector", default="conv1x1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the errors here")
    args = parser.parse_args()
    from dynconv.train import checkpoint as ckpt

    result = compare(ckpt.resolve_checkpoint(args.checkpoint), args.include, args.breadth, args.selector,
                     args.batch_size, args.seed)
    print(f"{'parameter':48s} {'original rule':>14s} {'detached':>10s}")
    for name in result["original"]:
        print(f"{name:48s} {result['original'][name]:14.2e} {result['detached'][name]:10.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
