"""Can the number of beeps be read from the frozen encoder's frames? A small probe says how far they carry it.

Renders groups of one to five beeps with the demo's own generator (half of them next to another
event, as in the demo's scenes), encodes them once with a saved model's frozen encoder, and trains a
small probe per frame rate: a linear layer and a bidirectional GRU over the frames stacked `k` at a
time (`k` = 8 is the demo projector's 160 ms token), mean-pooled into five classes. The held-out
accuracy bounds what the frames hold; the demo's own count accuracy (the LLM writing the caption) can
then be read against it.

    python benchmarks/count_probe.py runs/demo/stage1/final --out count-probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from torch import nn

from eardrum.adapters.checkpoint import load_pretrained
from eardrum.demo.data import render_events
from eardrum.demo.run import cpu_name

NEIGHBOURS = ({"type": "tone", "pitch": "low"}, {"type": "chirp", "direction": "rising"}, {"type": "noise"})


def beep_clips(count: int, seed: int) -> list[tuple[list[dict], int]]:
    """`count` (events, beeps - 1) pairs: one group of 1-5 beeps, half of the time followed by another event."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        beeps = rng.randint(1, 5)
        events = [{"type": "beeps", "pitch": rng.choice(["low", "high"]), "count": beeps}]
        if rng.random() < 0.5:
            events.append(dict(rng.choice(NEIGHBOURS)))
        out.append((events, beeps - 1))
    return out


def encode(model, processor, clips: list[tuple[list[dict], int]], seed: int) -> list[torch.Tensor]:
    """The encoder's frames of each rendered clip: a list of (T_i, D_enc)."""
    frames = []
    model.encoder.eval()
    with torch.no_grad():
        for i, (events, _) in enumerate(clips):
            features, lengths = processor.featurizer([render_events(events, seed + i)])
            out, out_lengths = model.encoder(features, lengths)  # (1, T, D_enc), (1,)
            frames.append(out[0, : int(out_lengths[0])])
    return frames


class Probe(nn.Module):
    """Frames stacked `stack` at a time -> linear -> bi-GRU -> mean over time -> five count classes."""

    def __init__(self, frame_dim: int, stack: int, hidden: int = 64) -> None:
        super().__init__()
        self.stack = stack
        self.inp = nn.Sequential(nn.Linear(frame_dim * stack, 2 * hidden), nn.GELU())
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, 5)

    def tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T // stack, stack * D): the frames a projector token of this rate sees."""
        usable = frames.shape[0] // self.stack * self.stack
        return frames[:usable].reshape(usable // self.stack, -1)

    def forward(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """Frames of B clips -> (B, 5) logits; each clip is pooled over its own tokens only."""
        tokens = [self.tokens(c) for c in clips]
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)  # (B, N_max, stack * D)
        hidden, _ = self.gru(self.inp(padded))  # (B, N_max, 2 * hidden)
        mask = torch.zeros(hidden.shape[:2])
        for row, t in enumerate(tokens):
            mask[row, : t.shape[0]] = 1.0
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 2 * hidden)
        return self.out(pooled)


def train_probe(frames, labels, stack: int, train: int, epochs: int, seed: int) -> dict:
    """Fits a probe on the first `train` clips; accuracy on the rest after every epoch."""
    torch.manual_seed(seed)
    probe = Probe(frames[0].shape[1], stack)
    optim = torch.optim.Adam(probe.parameters(), lr=1e-3)
    order, held = list(range(train)), list(range(train, len(frames)))
    history = []
    for epoch in range(epochs):
        random.Random(f"{seed}:{epoch}").shuffle(order)
        probe.train()
        for start in range(0, train, 16):
            rows = order[start : start + 16]
            logits = probe([frames[i] for i in rows])  # (B, 5)
            loss = nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in rows]))
            optim.zero_grad()
            loss.backward()
            optim.step()
        probe.eval()
        with torch.no_grad():
            guess = probe([frames[i] for i in held]).argmax(-1)
        history.append(float((guess == torch.tensor([labels[i] for i in held])).float().mean()))
    return {"held_out_accuracy_by_epoch": history, "held_out_accuracy_last": history[-1], "tokens_per_frame": 1 / stack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved eardrum model directory (its encoder is used)")
    parser.add_argument("--clips", type=int, default=1200, help="rendered clips, train and held out together")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--stacks", default="1,8", help="frames per probe token, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="count_probe.json")
    args = parser.parse_args()
    if not 0 < args.held_out < args.clips:
        raise SystemExit(f"--held-out: expected between 1 and --clips - 1 ({args.clips - 1}), got {args.held_out}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_pretrained(args.model)
    clips = beep_clips(args.clips, args.seed)
    frames = encode(model, processor, clips, seed=10_000 + args.seed)
    labels = [label for _, label in clips]
    train = args.clips - args.held_out
    probes = {f"stack_{k}": train_probe(frames, labels, int(k), train, args.epochs, args.seed)
              for k in args.stacks.split(",")}
    result = {"model": args.model, "clips": args.clips, "held_out": args.held_out, "epochs": args.epochs,
              "probes": probes, "seconds": round(time.perf_counter() - start, 1), "machine": cpu_name(),
              "threads": args.threads}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({name: round(p["held_out_accuracy_last"], 3) for name, p in probes.items()}))


if __name__ == "__main__":
    main()
