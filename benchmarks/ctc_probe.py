"""How much of a transcript can the demo's projector learn to read out of the frozen encoder's frames?

A probe of stage 1's speech half without the LLM's cost: the demo recipe's projector (fresh, the
same shape) is trained alone with the CTC loss `AudioLLM.ctc_loss` computes (audio tokens read
through the frozen LLM's token embeddings as a vocabulary) on the demo's spoken training sentences,
then greedy-decoded (best token per audio token, repeats merged, blanks dropped) on
- 150 of those training clips (what it memorised),
- the demo's held-out speech (voices and sentences never trained on),
- the real human speech set (`eardrum.demo.real_speech`).
The gap between the first and the other two is how far the training data generalises at all, before
any LLM is asked to transcribe; it takes minutes where a stage-1 run takes a quarter of an hour.

    python benchmarks/ctc_probe.py --epochs 6 --out ctc-probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from eardrum.adapters.audio import load_audio
from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.sources import default_cache_dir
from eardrum.demo.assets import fetch_assets
from eardrum.demo.data import NO_SPEECH, build_demo_data
from eardrum.demo.real_speech import build_manifest
from eardrum.demo.run import cpu_name, demo_wer
from eardrum.training.recipe import load_recipe


def spoken(manifest: Path) -> list[tuple[Path, str]]:
    """(clip path, transcript) of the manifest's lines that hold speech."""
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    pairs = [(manifest.parent / x["audio"], x.get("transcript", x["text"])) for x in lines]
    return [(audio, text) for audio, text in pairs if text and not text.startswith(NO_SPEECH.rstrip("."))]


@torch.no_grad()
def encode(model, processor, clips: list[tuple[Path, str]], batch: int = 16) -> list[torch.Tensor]:
    """The frozen encoder's frames of each clip: a list of (T_i, D_enc)."""
    frames = []
    for start in range(0, len(clips), batch):
        features, lengths = processor.featurizer([load_audio(a) for a, _ in clips[start : start + batch]])
        out, out_lengths = model.encoder(features, lengths)  # (b, T, D_enc), (b,)
        frames += [out[k, : int(out_lengths[k])].clone() for k in range(out.shape[0])]
    return frames


def project(model, frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of B clips -> audio tokens (B, N_max, D_llm), token lengths (B,)."""
    lengths = torch.tensor([f.shape[0] for f in frames])
    return model.projector(nn.utils.rnn.pad_sequence(frames, batch_first=True), lengths)


def ctc_step_loss(model, frames: list[torch.Tensor], targets: list[list[int]], blank: int) -> torch.Tensor:
    """The mean CTC loss per target token, as `AudioLLM.ctc_loss` computes it in training."""
    tokens, lengths = project(model, frames)
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (B, N_max): real audio tokens
    ctc = {"rows": torch.arange(len(frames)), "targets": torch.tensor([t for ids in targets for t in ids]),
           "target_lengths": torch.tensor([len(ids) for ids in targets]), "blank": blank}
    return model.ctc_loss(tokens, mask, ctc)


@torch.no_grad()
def greedy(model, tokenizer, frames: list[torch.Tensor], blank: int, batch: int = 32) -> list[str]:
    """Greedy CTC decoding of each clip's audio tokens into text."""
    table = model.llm.get_input_embeddings().weight.float()  # (V, D_llm)
    texts = []
    for start in range(0, len(frames), batch):
        tokens, lengths = project(model, frames[start : start + batch])
        best = (tokens.float() @ table.T).argmax(-1)  # (b, N_max)
        for row in range(best.shape[0]):
            ids, previous = [], None
            for token in best[row, : int(lengths[row])].tolist():
                if token != previous and token != blank:
                    ids.append(token)
                previous = token
            texts.append(tokenizer.decode(ids).strip())
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-share", type=float, default=1.0,
                        help="train on this share of the spoken training clips (a data-scaling point)")
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed and the probe's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ctc-probe.json")
    args = parser.parse_args()
    if not 0 < args.train_share <= 1:
        raise SystemExit(f"--train-share: expected a share in (0, 1], got {args.train_share}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    assets = fetch_assets(progress=print)
    data = build_demo_data(default_cache_dir() / "demo-data", assets, seed=args.seed)
    recipe = load_recipe("demo", [f"model.encoder={assets.whisper}", f"model.llm={assets.llm}"])
    model, processor = build_audio_llm(recipe.model)
    tokenizer = processor.tokenizer
    blank = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.llm.requires_grad_(False)
    train = spoken(data["asr_train"])
    train = random.Random(args.seed).sample(train, round(args.train_share * len(train)))
    sets = {"train": train, "held_out_voices": spoken(data["asr_test"]),
            "real_speech": spoken(build_manifest(default_cache_dir() / "real-speech"))}
    frames = {name: encode(model, processor, clips) for name, clips in sets.items()}
    targets = [tokenizer(" " + text.strip(), add_special_tokens=False).input_ids for _, text in sets["train"]]
    seen = random.Random(args.seed).sample(range(len(sets["train"])), min(150, len(sets["train"])))
    print({name: len(clips) for name, clips in sets.items()}, f"encoded in {time.perf_counter() - start:.0f} s")

    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=args.lr, weight_decay=0.01)
    order = list(range(len(targets)))
    steps = args.epochs * math.ceil(len(order) / args.batch_size)
    history, step = [], 0
    for epoch in range(args.epochs):
        random.Random(f"{args.seed}:{epoch}").shuffle(order)
        model.projector.train()
        losses = []
        for first in range(0, len(order), args.batch_size):
            rows = order[first : first + args.batch_size]
            for group in optimizer.param_groups:  # cosine from lr to 0
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = ctc_step_loss(model, [frames["train"][i] for i in rows], [targets[i] for i in rows], blank)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        model.projector.eval()
        wer = {"train_sentences": demo_wer([sets["train"][i][1] for i in seen],
                                           greedy(model, tokenizer, [frames["train"][i] for i in seen], blank))}
        for name in ("held_out_voices", "real_speech"):
            wer[name] = demo_wer([text for _, text in sets[name]], greedy(model, tokenizer, frames[name], blank))
        history.append({"epoch": epoch + 1, "ctc_loss": round(sum(losses) / len(losses), 3),
                        "wer": {k: round(v, 3) for k, v in wer.items()}})
        print(history[-1], flush=True)
    examples = [{"reference": text, "hypothesis": hyp} for (_, text), hyp in
                zip(sets["real_speech"], greedy(model, tokenizer, frames["real_speech"], blank))]
    result = {"projector": recipe.model.projector.to_dict(), "encoder": assets.whisper_name,
              "clips": {name: len(clips) for name, clips in sets.items()},
              "distinct_training_sentences": len({text for _, text in sets["train"]}),
              "train_share": args.train_share, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed,
              "history": history, "real_speech_examples": examples[:10],
              "seconds": round(time.perf_counter() - start, 1), "machine": cpu_name(),
              "threads": args.threads}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
