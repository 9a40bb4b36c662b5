"""Train the bundled reference DiT on scikit-learn's digits (seeded, checkpointed, resumable).

    python -m compress.models.reference.train --steps 6000 --workdir runs/reference

Kill it at any time; running the same command again resumes from the newest checkpoint. At the end
the EMA weights are written into the package (``reference_dit.safetensors``) with their config.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress.diffusion.schedules import training_scheduler
from compress.models.dit import DiT
from compress.models.reference import REFERENCES, WEIGHTS, digits_dataset


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(steps: int, workdir: Path, batch: int = 128, lr: float = 3e-4, ema_decay: float = 0.999,
          ckpt_every: int = 250, seed: int = 0, export: Path | None = WEIGHTS, init_from: Path | None = None,
          cosine: bool = False, name: str = "reference") -> DiT:
    """Train (or, with ``init_from``, continue training from released weights) and export the EMA.

    ``cosine`` decays the learning rate to zero over ``steps``: the usual way to finish a run. ``name``
    picks the bundled model's configuration (``reference`` or ``reference-p1``).
    """
    config = REFERENCES[name][0]
    torch.manual_seed(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    images, labels = digits_dataset()
    model = DiT(config)
    prior_steps = 0
    if init_from is not None:
        from safetensors import safe_open

        with safe_open(str(init_from), "pt") as f:
            prior_steps = int((f.metadata() or {}).get("train_steps", 0))
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        print(f"initialised from {init_from} ({prior_steps} earlier steps)", flush=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = training_scheduler()
    gen = torch.Generator().manual_seed(seed)
    step = 0
    ckpt = workdir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step = int(state["step"])
        print(f"resumed from {ckpt} at step {step}", flush=True)
    model.train()
    t0, losses = time.time(), []
    while step < steps:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        for g in opt.param_groups:  # short linear warm-up
            g["lr"] = lr * min(1.0, (step + 1) / 200)
            if cosine:
                g["lr"] *= 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.mse_loss(model(xt, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {sum(losses) / len(losses):.4f} {(time.time() - t0) / len(losses):.2f}s/step",
                  flush=True)
            losses, t0 = [], time.time()
        if step % ckpt_every == 0 or step == steps:
            _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                "gen": gen.get_state(), "step": step}, ckpt)
    if export is not None:
        sd = {k: v.contiguous() for k, v in ema.state_dict().items()}
        meta = {"dit_config": json.dumps(config.to_dict()), "train_steps": str(prior_steps + step),
                "seed": str(seed), "init_from": str(init_from or "")}
        tmp = export.with_suffix(".tmp")
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, export)
        print(f"wrote {export}", flush=True)
    return ema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--workdir", type=Path, default=Path("runs/reference"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=sorted(REFERENCES), default="reference", help="which bundled model to train")
    p.add_argument("--export", type=Path, default=None, help="weights file to write (default: the bundled one)")
    p.add_argument("--init-from", type=Path, default=None, help="continue from these weights (e.g. the shipped ones)")
    p.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to zero over --steps")
    a = p.parse_args()
    export = a.export or REFERENCES[a.model][1]
    train(a.steps, a.workdir, a.batch, a.lr, ckpt_every=a.ckpt_every, seed=a.seed, export=export,
          init_from=a.init_from, cosine=a.cosine, name=a.model)


if __name__ == "__main__":
    main()
