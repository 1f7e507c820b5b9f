#!/usr/bin/env python3
"""Speed of a tight PyTorch DIN (no DeepCTR) on a `din bench gen` data set,
measured the way `din bench run` measures din. Prints one JSON object with
din's key names.

    python bench/torch_din_speed.py --data runs/bench-data --threads 2 \
        --batch-size 1024 --att-hidden 80,40 --embedding-dim 8 --mode compile --json

--mode picks how PyTorch runs the same model:

- eager: plain PyTorch;
- compile: torch.compile (TorchInductor, C++/OpenMP code generated for this
  CPU) of the model's forward, and so of its backward in training;
- bf16-compile: the same under torch.autocast("cpu", dtype=torch.bfloat16),
  so the linear layers run in bf16 (oneDNN) with FP32 master weights and Adam
  state. On a CPU without AVX512-BF16 or AMX that is emulated and slow; the
  JSON names the CPU's flags.

The model is din's bench model and nothing else: embedding dim E for user_id,
item_id and cate_id, the histories sharing the item and category tables
(padded to 50, id 0, masked by length, as din masks); the local activation
unit over [q, k, q-k, q*k] (q = [item, cate], 2E) with the --att-hidden
units, PReLU (per-channel slope, initial 0 as din's) and Dense(1); padding
scores set to 0, no softmax; weighted-sum pooling; DNN (200, 80) PReLU over
[user, item, cate, pooled] and a logit; BCE with logits (mean), Adam lr 0.001
(fused). Glorot-uniform weights and zero biases, as din. Embeddings get dense
gradients and dense Adam, as PyTorch's default nn.Embedding does (and as
DeepCTR-Torch and Keras train DIN). --first-layer split computes the first
attention layer as din does, q·(Wq+Wd) once per sample plus
[k, q*k]·[Wk-Wd; Wp] per behaviour (exact); concat (the default) builds the
[B, 50, 4D] input as the textbook model does.

Reading and padding the data, building the model and compiling are not
timed: before each timed phase, untimed warm-up calls run every batch shape
the phase will see (the full batch and the last, shorter one), so that
torch.compile has compiled each graph. Measured:

- train_samples_per_second: one epoch over all samples (shuffled) at
  --batch-size: forward, loss, backward, Adam step.
- inference_samples_per_second_batch_4096: forward under
  torch.inference_mode() over all samples in slices of 4096 rows.
- latency_ms_1x200_median / _p99: row --latency-row's user and history x 200
  random candidates (speed_common.latency_batch), one forward call on
  prepared tensors under torch.inference_mode(), --warmup untimed calls, then
  --repetitions timed calls.
- full_history_latency_ms_1x200_median / _p99: the same for row
  --full-history-row (default: the first row with a full history of 50
  behaviours; -1 skips it), the request `bench/serve_load.sh` times.
- peak_rss_mib: ru_maxrss at the end (also after import and after loading).
- train_loss: mean BCE over the timed epoch (< 0.69 means it learns).
"""
import json
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing speed_common
from speed_common import latency_batch, load, parse_args, peak_rss_mib, quantile


def glorot(linear):
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Din(nn.Module):
    """din's bench model over padded histories; see the module docstring."""

    def __init__(self, vocab, e, att_hidden, split):
        super().__init__()
        self.user = nn.Embedding(vocab["user_id"], e)
        self.item = nn.Embedding(vocab["item_id"], e)
        self.cate = nn.Embedding(vocab["cate_id"], e)
        for emb in (self.user, self.item, self.cate):
            nn.init.uniform_(emb.weight, -0.05, 0.05)
        d = 2 * e
        self.split = split
        widths = [4 * d, *att_hidden]
        self.att = nn.ModuleList(glorot(nn.Linear(a, b)) for a, b in zip(widths, widths[1:]))
        self.att_act = nn.ModuleList(nn.PReLU(h, init=0.0) for h in att_hidden)
        self.att_out = glorot(nn.Linear(widths[-1], 1))
        widths = [5 * e, 200, 80]
        self.dnn = nn.ModuleList(glorot(nn.Linear(a, b)) for a, b in zip(widths, widths[1:]))
        self.dnn_act = nn.ModuleList(nn.PReLU(h, init=0.0) for h in widths[1:])
        self.out = glorot(nn.Linear(widths[-1], 1))

    def forward(self, user, item, cate, hist_item, hist_cate, hist_len):
        q = torch.cat([self.item(item), self.cate(cate)], dim=-1)  # [B, D]
        k = torch.cat([self.item(hist_item), self.cate(hist_cate)], dim=-1)  # [B, L, D]
        b, length, d = k.shape
        qe = q.unsqueeze(1).expand(b, length, d)  # [B, L, D]
        first = self.att[0]
        if self.split:
            w = first.weight  # [H1, 4D] over [q, k, q-k, q*k]
            wq, wk, wd, wp = w[:, :d], w[:, d:2 * d], w[:, 2 * d:3 * d], w[:, 3 * d:]
            per_sample = F.linear(q, wq + wd, first.bias)  # [B, H1]
            h = F.linear(torch.cat([k, qe * k], dim=-1), torch.cat([wk - wd, wp], dim=1))  # [B, L, H1]
            h = h + per_sample.unsqueeze(1)
        else:
            h = first(torch.cat([qe, k, qe - k, qe * k], dim=-1))  # [B, L, H1]
        h = self.att_act[0](h.reshape(b * length, -1))
        for lin, act in zip(self.att[1:], self.att_act[1:]):
            h = act(lin(h))
        score = self.att_out(h).reshape(b, length)  # [B, L]
        mask = torch.arange(length, device=k.device).unsqueeze(0) < hist_len.unsqueeze(1)
        score = score * mask.to(score.dtype)  # padding scores are 0
        pooled = torch.bmm(score.unsqueeze(1), k).squeeze(1).to(q.dtype)  # [B, D]
        x = torch.cat([self.user(user), q, pooled], dim=-1)  # [B, 5E]
        for lin, act in zip(self.dnn, self.dnn_act):
            x = act(lin(x))
        return self.out(x).squeeze(-1)  # logits [B]


def tensors(x, idx=None):
    """The model's inputs from speed_common.load's arrays (rows `idx`)."""
    names = ("user_id", "item_id", "cate_id", "hist_item_id", "hist_cate_id", "hist_len")
    if idx is None:
        return tuple(torch.from_numpy(np.ascontiguousarray(x[n])) for n in names)
    return tuple(torch.from_numpy(np.ascontiguousarray(x[n][idx])) for n in names)


def cpu_description():
    """The CPU's model name and which of the flags that matter here it has."""
    name, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name":
                    name = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return name, [f for f in wanted if f in flags]


def full_history_row(x, want):
    """The first row whose history holds the whole max_len behaviours."""
    full = np.flatnonzero(x["hist_len"] == want)
    return int(full[0]) if len(full) else None


def main():
    def extra(ap):
        ap.add_argument("--mode", choices=("eager", "compile", "bf16-compile"), default="eager")
        ap.add_argument("--first-layer", choices=("concat", "split"), default="concat",
                        help="the first attention layer over the built [q, k, q-k, q*k] (concat) or split as din's")
        ap.add_argument("--full-history-row", type=int, default=None,
                        help="row of the second latency request (default: the first with a full history; -1: none)")

    args = parse_args(__doc__, extra)
    rss_import = peak_rss_mib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    x, y, vocab, max_len = load(args.data)
    rss_load = peak_rss_mib()
    n, e, b = len(y), args.embedding_dim, args.batch_size
    model = Din(vocab, e, args.att_hidden, args.first_layer == "split")
    optim = torch.optim.Adam(model.parameters(), lr=0.001, fused=True)
    run = torch.compile(model, dynamic=False) if args.mode != "eager" else model
    bf16 = args.mode == "bf16-compile"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step(inputs, labels):
        with autocast():
            logits = run(*inputs)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss.item()

    yt = torch.from_numpy(y)
    # Warm-up (untimed): one step on the first batch and, if the epoch ends
    # with a shorter batch, one on a batch of that size.
    model.train()
    compile_start = time.perf_counter()
    for size in sorted({b, n % b} - {0}, reverse=True):
        idx = np.arange(size)
        step(tensors(x, idx), yt[:size])
    train_warmup_seconds = time.perf_counter() - compile_start

    perm = torch.randperm(n).numpy()
    batches = [perm[s:s + b] for s in range(0, n, b)]
    inputs = [(tensors(x, idx), yt[torch.from_numpy(idx)]) for idx in batches]
    start = time.perf_counter()
    loss_sum = 0.0
    for xb, yb in inputs:
        loss_sum += step(xb, yb) * len(yb)
    train_seconds = time.perf_counter() - start
    train_loss = loss_sum / n

    # Inference: forward on prepared slices of 4096 rows.
    model.eval()
    slices = [tensors(x, np.arange(s, min(s + 4096, n))) for s in range(0, n, 4096)]
    with torch.inference_mode(), autocast():
        for size_slice in {len(s[0]): s for s in slices}.values():
            run(*size_slice)  # warm-up: each shape once
        start = time.perf_counter()
        scores = [torch.sigmoid(run(*s).float()) for s in slices]
        infer = n / (time.perf_counter() - start)
    assert torch.isfinite(torch.cat(scores)).all()

    def latency(row):
        one = tensors(latency_batch(x, row=row))
        with torch.inference_mode(), autocast():
            for _ in range(args.warmup):
                torch.sigmoid(run(*one).float())
            lat = []
            for _ in range(args.repetitions):
                t = time.perf_counter()
                torch.sigmoid(run(*one).float())
                lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        return quantile(lat, 0.5), quantile(lat, 0.99), int(x["hist_len"][row])

    lat_median, lat_p99, lat_len = latency(args.latency_row)
    full_row = args.full_history_row
    if full_row is None:
        full_row = full_history_row(x, max_len)
    full = latency(full_row) if full_row is not None and full_row >= 0 else (None, None, None)

    cpu, flags = cpu_description()
    print(json.dumps({
        "impl": f"pytorch-{args.mode}",
        "mode": args.mode,
        "first_layer": args.first_layer,
        "threads": args.threads,
        "batch_size": b,
        "samples": n,
        "mean_history": float(x["hist_len"].mean()),
        "embedding_dim": e,
        "att_hidden": list(args.att_hidden),
        "train_samples_per_second": n / train_seconds,
        "train_loss": train_loss,
        "train_warmup_seconds": train_warmup_seconds,
        "inference_samples_per_second_batch_4096": infer,
        "latency_ms_1x200_median": lat_median,
        "latency_ms_1x200_p99": lat_p99,
        "latency_row": args.latency_row,
        "latency_history_length": lat_len,
        "full_history_latency_ms_1x200_median": full[0],
        "full_history_latency_ms_1x200_p99": full[1],
        "full_history_latency_row": full_row,
        "full_history_length": full[2],
        "latency_method": "forward on prepared tensors under torch.inference_mode()",
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_mib_after_import": rss_import,
        "peak_rss_mib_after_load": rss_load,
        "cpu": cpu,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
