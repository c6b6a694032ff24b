"""Train the small Flux-architecture pipeline shipped as ``diffquant.default_pipeline_path()``.

It draws captioned coloured shapes ("a red circle above a blue square", "a green triangle on a
yellow background"; see scripts/shapes_data.py) at 64x64. Phases, each with a wall-time budget
(the machine is a 2-core CPU shared with other jobs, so budgets, not step counts, bound it):

1. VAE (AutoencoderKL, 16 latent channels, 8x downsampling): L1 + MSE reconstruction with a
   tiny KL term, mostly on random 32x32 crops (4x cheaper; the net is convolutional), then on
   full images of "loose" layouts. ``shift_factor`` / ``scaling_factor`` come from the
   statistics of the cached latents (Flux-style: z = (latent - shift) * scale).
2. Cache: encode a fixed set of "tight"-layout scenes to normalised latents [N, 16, 8, 8] plus
   caption ids (see shapes_data.LAYOUTS for why the transformer sees tight layouts).
3. Transformer (FluxTransformer2DModel, 16 packed image tokens) trained jointly with the tiny
   CLIP and T5 text encoders on the rectified-flow loss ||(noise - x0) - v(x_t, t)||^2,
   x_t = (1 - t) x0 + t noise, t ~ logit-normal; the EMA weights ship. Half of the two-object
   captions are swapped for their converse ("B below A"), and small heads (scripts/text_aux.py,
   not shipped) make the text encoders state which object is on top / left: without them the
   model learned colours and the relation's axis but drew "above" and "below" alike.
4. Decoder fine-tune with the encoder frozen (so the cached latents stay valid), on slightly
   noised latents so it forgives the transformer's errors. It needs nothing from phase 3, so
   ``--only-decoder`` runs it in a second process while phase 3 trains.

Checkpoints go to --work every few minutes; rerunning the same command resumes (a finished
phase is skipped), and raising a phase's budget continues it.

Usage:
    .venv/bin/python scripts/train_default.py --smoke          # a few steps of each phase
    .venv/bin/python scripts/train_default.py --only-decoder & # phase 4, once phase 2 is cached
    .venv/bin/python scripts/train_default.py                  # phases 1-3 (and 4 if not done)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_components import (SIZE, Denoiser, build_models, log, pack,  # noqa: E402
                                save_pipeline)
from shapes_data import MAX_TOKENS, build_tokenizers, converse, sample_batch  # noqa: E402
from text_aux import TextHeads, label_captions, pretrain_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- training helpers -------------------------------------------------------------------------
class Budget:
    """Wall-time budget for one phase; progress() in [0, 1] drives the learning-rate schedule."""

    def __init__(self, minutes: float, max_steps: int | None = None):
        self.start, self.seconds, self.max_steps = time.time(), minutes * 60, max_steps

    def progress(self, step: int) -> float:
        p = (time.time() - self.start) / self.seconds
        if self.max_steps:
            p = max(p, step / self.max_steps)
        return min(p, 1.0)


def lr_at(base: float, progress: float, step: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of base over the phase's wall-time budget."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- phase 1: VAE -----------------------------------------------------------------------------
def train_vae(vae, work: Path, minutes: float, max_steps, history: dict) -> None:
    ckpt = work / "vae.pt"
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    step, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, spent, history["vae"] = state["step"], state["spent"], state["history"]
        log(f"vae: resumed at step {step} ({spent / 60:.1f} min spent)")
    budget = Budget(minutes, max_steps)
    budget.start -= spent
    rng = np.random.default_rng(1000 + step)
    vae.train()
    last_save, running = time.time(), []
    while budget.progress(step) < 1.0:
        p = budget.progress(step)
        crop = p < 0.7                                   # full images for the last 30%
        x, _ = sample_batch(rng, 16 if crop else 8, SIZE)
        x = torch.from_numpy(x)                          # [B, 3, 64, 64] in [-1, 1]
        if crop:
            i, j = rng.integers(0, SIZE - 32, size=2)
            x = x[:, :, i:i + 32, j:j + 32]              # [B, 3, 32, 32]
        for g in opt.param_groups:
            g["lr"] = lr_at(2e-3, p, step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss_kl = 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        (loss + loss_kl).backward()
        opt.step()
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            history["vae"].append((step, float(np.mean(running))))
            log(f"vae step {step} rec {np.mean(running):.4f} kl {loss_kl.item():.2e} "
                f"{'crop' if crop else 'full'} lr {opt.param_groups[0]['lr']:.1e}")
            running = []
        if time.time() - last_save > 180:
            _save(ckpt, vae, opt, step, budget, history["vae"])
            last_save = time.time()
    _save(ckpt, vae, opt, step, budget, history["vae"])
    vae.eval()


def _save(path: Path, model, opt, step: int, budget: Budget, hist, ema=None, **extra) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
             "spent": time.time() - budget.start, "history": hist, **extra}
    if ema is not None:
        state["ema"] = ema
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)                 # never leave a half-written checkpoint


# -- phase 2: latent cache --------------------------------------------------------------------
@torch.no_grad()
def cache_latents(vae, clip_tok, t5_tok, work: Path, n: int) -> dict:
    """Encode n scenes; set the VAE's shift/scale so cached latents are ~N(0, 1)."""
    path = work / f"latents_tight_{n}.pt"
    if path.exists():
        data = torch.load(path)
        vae.register_to_config(shift_factor=data["shift"], scaling_factor=data["scale"])
        return _with_converse_ids(data, clip_tok, t5_tok)
    rng = np.random.default_rng(7)
    zs, caps = [], []
    for start in range(0, n, 256):
        x, c = sample_batch(rng, min(256, n - start), SIZE, layout="tight")
        zs.append(vae.encode(torch.from_numpy(x)).latent_dist.mean)   # [b, 16, 8, 8]
        caps += c
    z = torch.cat(zs)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    data = {"z": (z - shift) * scale, "captions": caps, "shift": shift, "scale": scale,
            "clip_ids": clip_tok(caps, padding="max_length", max_length=MAX_TOKENS,
                                 truncation=True, return_tensors="pt").input_ids,
            "t5_ids": t5_tok(caps, padding="max_length", max_length=MAX_TOKENS,
                             truncation=True, return_tensors="pt").input_ids}
    torch.save(data, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    log(f"cache: {n} latents, shift {shift:.4f} scale {scale:.4f}")
    return _with_converse_ids(data, clip_tok, t5_tok)


def _with_converse_ids(data: dict, clip_tok, t5_tok) -> dict:
    """Add token ids of each caption's converse ("B below A" for "A above B"), [N, 16] each."""
    alt = [converse(c) for c in data["captions"]]
    kw = dict(padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    data["clip_ids_alt"], data["t5_ids_alt"] = clip_tok(alt, **kw).input_ids, t5_tok(alt, **kw).input_ids
    data["slots"], data["roles"] = label_captions(data["captions"])      # [N, 6], [N, 16]
    data["roles_alt"] = label_captions(alt)[1]
    return data


# -- phase 3: transformer + text encoders -----------------------------------------------------
def train_denoiser(net: Denoiser, data: dict, work: Path, minutes: float, max_steps,
                   history: dict, batch: int = 32, base_lr: float = 1e-3) -> dict:
    ckpt = work / "denoiser.pt"
    opt = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    heads = TextHeads()
    heads_opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=0.01)
    step, spent, state = 0, 0.0, {}
    if ckpt.exists():
        state = torch.load(ckpt)
        net.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, spent, history["denoiser"], ema = (state["step"], state["spent"], state["history"],
                                                 state["ema"])
        log(f"denoiser: resumed at step {step} ({spent / 60:.1f} min spent)")
    if "heads" in state:
        heads.load_state_dict(state["heads"]), heads_opt.load_state_dict(state["heads_opt"])
    else:   # a fresh run, or a checkpoint from before the heads existed
        pretrain_text(net.clip, net.t5, heads, data, 300 if max_steps is None else 2, log)
    budget = Budget(minutes, max_steps)
    budget.start -= spent
    gen = torch.Generator().manual_seed(step)
    z, n = data["z"], data["z"].shape[0]
    last_save, running = time.time(), []
    net.train()
    while budget.progress(step) < 1.0:
        p = budget.progress(step)
        idx, x0, noise, t, x_t, clip_ids, t5_ids, roles = _flow_batch(data, z, n, batch, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(base_lr, p, step, warmup=200)
        pred, pooled, ctx = net(x_t, t, clip_ids, t5_ids, return_text=True)
        loss = F.mse_loss(pred, noise - x0)
        aux = heads.loss(pooled, ctx, data["slots"][idx], roles)
        opt.zero_grad(set_to_none=True), heads_opt.zero_grad(set_to_none=True)
        (loss + 0.05 * aux).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(), heads_opt.step()
        step += 1
        _ema_update(ema, net, step)
        running.append(loss.item())
        if step % 50 == 0:
            history["denoiser"].append((step, float(np.mean(running))))
            log(f"denoiser step {step} loss {np.mean(running):.4f} aux {aux.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.1e}")
            running = []
        if time.time() - last_save > 240:
            _save(ckpt, net, opt, step, budget, history["denoiser"], ema,
                  heads=heads.state_dict(), heads_opt=heads_opt.state_dict())
            last_save = time.time()
    _save(ckpt, net, opt, step, budget, history["denoiser"], ema,
          heads=heads.state_dict(), heads_opt=heads_opt.state_dict())
    net.load_state_dict(ema)
    net.eval()
    return ema


def _flow_batch(data: dict, z: torch.Tensor, n: int, batch: int, gen: torch.Generator):
    """One rectified-flow batch: (idx, x0, noise, t, x_t, clip_ids, t5_ids, roles), with half
    the captions swapped for their converse; draws from ``gen`` in a fixed order."""
    idx = torch.randint(0, n, (batch,), generator=gen)
    x0 = pack(z[idx])                                                # [B, 16, 64]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.sigmoid(torch.randn(batch, generator=gen))              # logit-normal in (0, 1)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    alt = (torch.rand(batch, generator=gen) < 0.5)[:, None]          # half the captions conversed
    clip_ids = torch.where(alt, data["clip_ids_alt"][idx], data["clip_ids"][idx])
    t5_ids = torch.where(alt, data["t5_ids_alt"][idx], data["t5_ids"][idx])
    roles = torch.where(alt, data["roles_alt"][idx], data["roles"][idx])
    return idx, x0, noise, t, x_t, clip_ids, t5_ids, roles


@torch.no_grad()
def _ema_update(ema: dict, net: torch.nn.Module, step: int) -> None:
    decay = min(0.995, (1 + step) / (10 + step))                     # EMA warm-up
    for k, v in net.state_dict().items():
        ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)


# -- phase 4: decoder fine-tune --------------------------------------------------------------
def finetune_decoder(vae, data: dict, work: Path, minutes: float, max_steps, history: dict) -> None:
    """Train only the decoder on full images, encoder frozen, so the cached latents stay valid.

    Latents get a little Gaussian noise (up to 0.15 in the normalised space the transformer
    samples in) so the decoder also tolerates the transformer's small errors.
    """
    ckpt = work / "decoder.pt"
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=5e-4)
    step, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, spent, history["decoder"] = state["step"], state["spent"], state["history"]
        log(f"decoder: resumed at step {step} ({spent / 60:.1f} min spent)")
    budget = Budget(minutes, max_steps)
    budget.start -= spent
    rng, gen = np.random.default_rng(5000 + step), torch.Generator().manual_seed(5000 + step)
    last_save, running = time.time(), []
    vae.train()
    while budget.progress(step) < 1.0:
        p = budget.progress(step)
        x = torch.from_numpy(sample_batch(rng, 16, SIZE)[0])          # [16, 3, 64, 64]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean                        # [16, 16, 8, 8]
            amount = torch.rand(z.shape[0], 1, 1, 1, generator=gen) * 0.15 / data["scale"]
            z = z + amount * torch.randn(z.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(5e-4, p, step, warmup=20)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            history["decoder"].append((step, float(np.mean(running))))
            log(f"decoder step {step} rec {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.1e}")
            running = []
        if time.time() - last_save > 180:
            _save(ckpt, vae, opt, step, budget, history["decoder"])
            last_save = time.time()
    _save(ckpt, vae, opt, step, budget, history["decoder"])
    vae.eval()


# -- ship -------------------------------------------------------------------------------------
def write_log(path: Path, args, history: dict, wall: float, data: dict, out: Path) -> None:
    def curve(name):
        pts = history[name]
        if not pts:
            return "  (none)"
        picks = sorted({0, len(pts) // 4, len(pts) // 2, 3 * len(pts) // 4, len(pts) - 1})
        return "  " + ", ".join(f"step {pts[i][0]}: {pts[i][1]:.4f}" for i in picks)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    lines = [
        "Default pipeline training log (scripts/train_default.py)",
        f"command: python scripts/train_default.py {' '.join(sys.argv[1:])}".rstrip(),
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu",
        f"images {SIZE}x{SIZE}, VAE 8x -> latents 16x8x8 -> 16 packed tokens; text <= {MAX_TOKENS} tokens",
        f"VAE: AutoencoderKL (16,16,32,32), L1+MSE+1e-7 KL, Adam 2e-3 cosine, crops 32px then full; "
        f"{args.vae_minutes} min budget",
        f"latent cache: {data['z'].shape[0]} 'tight'-layout scenes, shift_factor {data['shift']:.4f}, "
        f"scaling_factor {data['scale']:.4f}",
        f"denoiser: FluxTransformer2DModel dim 128 (2 double + 4 single blocks) + CLIP + T5 (trained "
        f"jointly), rectified flow, logit-normal t, AdamW {args.lr} cosine, batch 32, EMA 0.995, "
        f"half of the two-object captions replaced by their converse; "
        f"{args.minutes} min budget",
        "VAE reconstruction loss (L1+MSE, mean over 50 steps):", curve("vae"),
        "denoiser flow-matching loss (MSE, mean over 50 steps):", curve("denoiser"),
        f"decoder fine-tune (encoder frozen, latent noise <= 0.15): L1+MSE, Adam 5e-4 cosine, "
        f"batch 16; {args.decoder_minutes} min budget", curve("decoder"),
        f"wall time {wall / 60:.1f} min; shipped directory {size / 1e6:.1f} MB",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "src/diffquant/assets/default")
    ap.add_argument("--work", type=Path, default=Path("/tmp/diffquant_default_train"))
    ap.add_argument("--vae-minutes", type=float, default=10.0)
    ap.add_argument("--minutes", type=float, default=40.0, help="denoiser budget")
    ap.add_argument("--decoder-minutes", type=float, default=25.0)
    ap.add_argument("--only-decoder", action="store_true",
                    help="run phase 4 alone (beside a run in its denoiser phase), then stop")
    ap.add_argument("--cache", type=int, default=16000, help="number of cached scenes")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is ~4x faster than 2 when other jobs share the 2 cores (measured)")
    ap.add_argument("--smoke", action="store_true", help="a few steps per phase, into --work")
    args = ap.parse_args(argv)
    if args.smoke:
        args.out, args.cache = args.work / "smoke_pipeline", 512
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    started = args.work / "started.txt"                 # wall time spans resumed runs too
    if not started.exists():
        started.write_text(str(time.time()))
    smoke = 3 if args.smoke else None
    clip_tok, t5_tok = build_tokenizers()
    vae, transformer, clip, t5 = build_models(clip_tok, t5_tok)
    history = {"vae": [], "denoiser": [], "decoder": []}
    train_vae(vae, args.work, args.vae_minutes, smoke, history)
    data = cache_latents(vae, clip_tok, t5_tok, args.work, args.cache)
    if args.only_decoder:
        finetune_decoder(vae, data, args.work, args.decoder_minutes, smoke, history)
        return
    net = Denoiser(transformer, clip, t5)
    train_denoiser(net, data, args.work, args.minutes, smoke, history, base_lr=args.lr)
    finetune_decoder(vae, data, args.work, args.decoder_minutes, smoke, history)
    save_pipeline(args.out, vae, net, clip_tok, t5_tok)
    wall = time.time() - float(started.read_text())
    if not args.smoke:
        write_log(REPO / "docs/training_log.txt", args, history, wall, data, args.out)
    log(f"done: {wall / 60:.1f} min since the first start")


if __name__ == "__main__":
    main()
