"""Peer side of `kiln bench train`: the same GPT-2-style model trained in PyTorch eager on CPU.

kiln runs this script in a child process per measurement, with OMP_NUM_THREADS and
MKL_NUM_THREADS set to the thread count, and reads one JSON object from stdout. The model is
written the way a PyTorch user would write it, matching kiln's `Style::Gpt2` decoder op for op:

- token + learned position embeddings, pre-norm blocks, a final LayerNorm, the output projection
  tied to the token embedding (so the logits matmul and its gradient are the same work);
- attention with separate q, k, v Linears (as kiln has them) and `F.scaled_dot_product_attention`
  with `is_causal=True`; a 4x GELU(tanh) MLP; biases on every Linear and LayerNorm;
- `F.cross_entropy` over all positions; `torch.optim.AdamW` (its default CPU implementation) with
  kiln's two groups: weight decay on the block matrices, none on embeddings, norms and biases;
  `clip_grad_norm_` every step.

Timing covers one whole optimizer step (zero_grad, forward, backward, clip, update, and reading
the loss, which kiln's `train_step` also does). Model creation and the warm-up steps are excluded.
Peak memory is `ru_maxrss` of this process (KiB on Linux); mode "idle" reports the same for a
process that only imported torch, so kiln can show the training's own share.
"""
import contextlib
import json
import math
import os
import resource
import sys
import time


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def idle(args):
    import torch

    torch.set_num_threads(args["threads"])
    return {"torch": torch.__version__, "peak_rss_kib": peak_rss_kib()}


def train(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    V, T, B = args["vocab"], args["seq_len"], args["batch"]
    L = args["depth"]
    d = 64 * L
    H = L
    D = d // H

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d, eps=1e-5)
            self.q_proj = nn.Linear(d, d)
            self.k_proj = nn.Linear(d, d)
            self.v_proj = nn.Linear(d, d)
            self.o_proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d, eps=1e-5)
            self.up_proj = nn.Linear(d, 4 * d)
            self.down_proj = nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln_1(x)
            q = self.q_proj(h).view(b, t, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(h).view(b, t, H, D).transpose(1, 2)
            v = self.v_proj(h).view(b, t, H, D).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(b, t, d)
            x = x + self.o_proj(y)
            h = self.ln_2(x)
            return x + self.down_proj(F.gelu(self.up_proj(h), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, d)
            self.wpe = nn.Embedding(T, d)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(d, eps=1e-5)
            # kiln's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L).
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif ".ln_" in name or name.startswith("ln_"):
                    nn.init.ones_(p)
                else:
                    std = 0.02
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        std /= math.sqrt(2 * L)
                    nn.init.normal_(p, 0.0, std)

        def forward(self, ids, targets):
            t = ids.shape[1]
            pos = torch.arange(t, device=ids.device)
            x = self.wte(ids) + self.wpe(pos)
            for blk in self.blocks:
                x = blk(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output projection
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = GPT()
    decay = [p for n, p in model.named_parameters() if n.startswith("blocks.") and
             n.endswith("_proj.weight")]
    rest = [p for n, p in model.named_parameters() if not (n.startswith("blocks.") and
            n.endswith("_proj.weight"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args["weight_decay"]},
         {"params": rest, "weight_decay": 0.0}],
        lr=args["lr"], betas=(args["beta1"], args["beta2"]), eps=1e-8)
    params = list(model.parameters())

    g = torch.Generator().manual_seed(args["seed"])
    n = args["warmup"] + args["steps"]
    windows = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(n)]
    batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]

    # bf16: PyTorch's own mixed precision on the CPU (matmuls in bf16, weights and the
    # optimizer in f32), the counterpart of kiln's --precision bf16.
    def precision():
        if args.get("precision") == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args["grad_clip"])
        opt.step()
        losses.append(loss.item())
        dt = time.perf_counter() - t0
        if i >= args["warmup"]:
            times.append(dt)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "params": sum(p.numel() for p in params),
        "precision": args.get("precision", "f32"),
        "step_s": times,
        "losses": losses,
        "peak_rss_kib": peak_rss_kib(),
    }


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps({"idle": idle, "train": train}[args["mode"]](args)))
