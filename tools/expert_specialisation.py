"""How far did a staged run's experts specialise? Compares the switched layers of a staged
checkpoint with the plain conv they were copied from (the branch point) and with the plain
control trained on for the same steps.

Per converted layer it prints:

- ``drift plain``: ||W_control - W_branch|| / ||W_branch||, how far the plain kernel moved in
  the second stage;
- ``drift experts``: the same for each expert (mean, and min-max over experts);
- ``spread``: the experts' mean distance from their own mean kernel, relative to ||W_branch||
  (0 means the experts are still copies of one kernel);
- ``usage``: the share of output pixels each expert takes on the batches (min-max), and the
  normalised routing entropy (1 = every expert used equally);
- ``grad share``: each expert's weight-gradient norm on the batches, relative to the plain
  control's kernel gradient norm on the same batches (min-max): the gradient signal an expert
  gets compared to the dense kernel it replaced.

Usage::

    python tools/expert_specialisation.py --branch OUT/branch_points/plain/seed0/step_00002500 \\
        --control OUT/runs/plain/seed0 --staged OUT/runs/staged/seed0 [--batches 8]

The batches are training patches (the staged run's training split, its seed), never a test set.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from dynconv.nn import SwitchedConv2d
from dynconv.train import checkpoint as ckpt
from dynconv.train.experiment import build_split, check_config, load_checkpoint_model
from dynconv.train.tasks import TASKS


def _training_batches(config, count: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    dataset = build_split(config, config.data.train_split, config.data.train_options)
    generator = torch.Generator().manual_seed(config.train.seed)
    order = torch.randperm(len(dataset), generator=generator)[: count * batch_size].tolist()
    items = [dataset[i] for i in order]
    return [{k: torch.stack([it[k] for it in items[b * batch_size:(b + 1) * batch_size]]) for k in items[0]}
            for b in range(count)]


def _kernel_gradients(model: torch.nn.Module, names: list[str], batches, task) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of the L1 loss's gradient w.r.t. each named layer's ``weight``."""
    model.train()  # routing as in training; SwitchNorm's buffer is restored below
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k}
    layers = dict(model.named_modules())
    grads = {n: torch.zeros_like(layers[n].weight) for n in names}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = task.wrap(model(batch[task.input]))
        pred, target = task.scored(out, batch)
        (pred - target).abs().mean().backward()
        for n in names:
            grads[n] += layers[n].weight.grad.detach().abs()
    model.load_state_dict(buffers, strict=False)
    return grads


def _selection_share(model: torch.nn.Module, names: list[str], batches, task) -> dict[str, torch.Tensor]:
    layers = dict(model.named_modules())
    counts = {n: torch.zeros(layers[n].breadth) for n in names}
    model.eval()
    hooks = []
    for n in names:
        def hook(module, args, _out, n=n):
            probs = module.routing_probabilities(args[0])
            counts[n] += torch.bincount(probs.argmax(1).flatten(), minlength=module.breadth).float()
        hooks.append(layers[n].register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch[task.input])
    for h in hooks:
        h.remove()
    return {n: c / c.sum() for n, c in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", required=True, help="the plain checkpoint the staged run was converted from")
    parser.add_argument("--control", required=True, help="the plain control's run directory or checkpoint")
    parser.add_argument("--staged", required=True, help="the staged run's run directory or checkpoint")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    def checkpoint(path: str) -> Path:
        path = Path(path)
        return ckpt.latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path

    torch.manual_seed(0)
    branch, _, _ = load_checkpoint_model(checkpoint(args.branch))
    control, _, _ = load_checkpoint_model(checkpoint(args.control))
    staged, config, meta = load_checkpoint_model(checkpoint(args.staged))
    task = TASKS[check_config(config, training=False)]
    names = [n for n, m in staged.named_modules() if isinstance(m, SwitchedConv2d)]
    batches = _training_batches(config, args.batches, args.batch_size)
    staged_grads = _kernel_gradients(staged, names, batches, task)
    control_grads = _kernel_gradients(control, names, batches, task)
    shares = _selection_share(staged, names, batches, task)
    b_layers, c_layers, s_layers = dict(branch.named_modules()), dict(control.named_modules()), dict(staged.named_modules())
    print(f"staged: {checkpoint(args.staged)} (step {meta.get('step')}); {args.batches} training batches of {args.batch_size}")
    print("| layer | drift plain | drift experts mean (min-max) | spread | usage min-max | entropy | grad share min-max |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        w0 = b_layers[n].weight.detach()
        scale = w0.norm()
        drift_plain = ((c_layers[n].weight.detach() - w0).norm() / scale).item()
        experts = s_layers[n].weight.detach()
        drift = torch.stack([(e - w0).norm() / scale for e in experts])
        spread = torch.stack([(e - experts.mean(0)).norm() / scale for e in experts]).mean().item()
        share = shares[n]
        entropy = -(share.clamp_min(1e-12) * share.clamp_min(1e-12).log()).sum().item() / math.log(len(share))
        grad = torch.stack([g.norm() for g in staged_grads[n]]) / control_grads[n].norm()
        print(f"| {n} | {drift_plain:.3f} | {drift.mean():.3f} ({drift.min():.3f}-{drift.max():.3f}) | {spread:.3f} | "
              f"{share.min():.1%}-{share.max():.1%} | {entropy:.2f} | {grad.min():.2f}-{grad.max():.2f} |")


if __name__ == "__main__":
    main()
