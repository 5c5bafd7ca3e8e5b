"""Writes `demo/sentences.txt`: varied everyday English sentences for the demo's transcription data.

The demo's template sentences (`eardrum.demo.text.sentences`) come from twenty patterns: a projector
trained on them alone learns to pick a pattern and fill its slots, and on any other sentence, from a
real person or a synthetic voice alike, it answers with a pattern sentence. Transcription needs
sentences of every shape. This script has SmolLM2-135M-Instruct (the demo's own LLM, fetched from
PyPI) write them: five sentences per (style, topic) prompt, sampled, then cut into sentences and kept only
where a voice can say them as written (letters and simple punctuation, 4-16 words, no digits).

The file is shipped so that a fresh machine does not spend minutes generating it; rerun this script
to remake it (same seed, same file on the same library versions):

    python -m eardrum.demo.make_sentences --out demo/sentences.txt
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
from pathlib import Path

STYLES = (
    "Write five different short sentences that people might say to a friend about {topic}.",
    "Write five different sentences from news reports about {topic}.",
    "Write five different sentences from a children's story about {topic}.",
    "Write five different questions that people might ask about {topic}.",
    "Write five different sentences from phone calls about {topic}.",
    "Write five different sentences that a teacher might say in a lesson about {topic}.",
    "Write five different sentences from a diary about {topic}.",
    "Write five different instructions that someone might give a colleague about {topic}.",
)
LIST_FORM = " One sentence per line, no numbering."
TOPICS = (
    "cooking dinner|the weather|a train journey|gardening|a football match|a birthday party|the ocean|a job interview|"
    "a broken car|the library|a doctor's appointment|a mountain hike|piano lessons|a rainy morning|buying shoes|"
    "a lost cat|moving house|a wedding|homework|a camping trip|the news|a new computer|paying the rent|a museum|"
    "a thunderstorm|the post office|a family dinner|learning to swim|a traffic jam|a bakery|a school play|"
    "a hotel room|winter clothes|a farm|the dentist|a river|a science experiment|a bicycle|an old photograph|"
    "a concert|a late bus|the kitchen sink|a dog walk|a first day at work|a market stall|a snowy road|"
    "a history lesson|planting trees|a hospital|a holiday abroad|a neighbour's noise|a bank account|a recipe|"
    "a forest|a fishing trip|an airport delay|a chess game|a dance class|a lighthouse|a picnic|a power cut|"
    "a painting|a village fair|a broken window|a spelling test|the moon and stars|a cup of tea|a running race|"
    "an insurance claim|a leaking roof|a film|a coffee shop|a garden party|a city council meeting|a lost wallet|"
    "a new baby|a rugby game|the harvest|a sailing boat|a computer virus|a shopping list|a haircut|"
    "the election|a washing machine|a desert|a volcano|an orchestra|a cold|a tennis match|a bookshop|"
    "a ghost story|an elephant|a pet rabbit|the supermarket|a police officer|a kite|a bridge|a candle|"
    "a software bug|a parking ticket|a cruise|a spider|a bus driver|a newspaper|a quiet evening|a lecture"
).split("|")
ALLOWED = re.compile(r"^[A-Z][A-Za-z' ,;:.!?-]*[.!?]$")
LEAD_INS = re.compile(r"^(here'?s|here is|sure|a person might|someone might|i imagine|one possible|example|"
                      r"the sentence|a sentence|sentence|in this|note)\b", re.IGNORECASE)
MIN_WORDS, MAX_WORDS = 4, 16


def candidate_sentences(reply: str) -> list[str]:
    """The sayable sentences in one reply, line by line: list numbering is stripped, quoted speech is
    unwrapped, lead-ins ("A person might say ...") are dropped, and each sentence must pass `ALLOWED`
    and hold 4-16 words."""
    return [s for line in reply.splitlines() for s in _line_sentences(re.sub(r"^[\s\d.)\]\[*-]+", "", line))]


def _line_sentences(reply: str) -> list[str]:
    text = reply.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    quoted = re.findall(r'"([^"]+)"', text)
    pieces = quoted if quoted else [text]
    out = []
    for piece in pieces:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(piece.split())):
            sentence = sentence.strip(" *-")
            words = sentence.split()
            if (ALLOWED.match(sentence) and MIN_WORDS <= len(words) <= MAX_WORDS
                    and not LEAD_INS.match(sentence) and "  " not in sentence):
                out.append(sentence)
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eardrum.demo.assets import fetch_assets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo/sentences.txt")
    parser.add_argument("--rounds", type=int, default=1, help="samples per (style, topic) prompt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    llm = fetch_assets(progress=None).llm
    tokenizer = AutoTokenizer.from_pretrained(str(llm.parent), gguf_file=llm.name)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(llm.parent), gguf_file=llm.name).eval()
    prompts = [style.format(topic=topic) for style, topic in itertools.product(STYLES, TOPICS)] * args.rounds
    random.Random(args.seed).shuffle(prompts)
    seen: set[str] = set()
    kept: list[str] = []
    for start in range(0, len(prompts), args.batch_size):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p + LIST_FORM}], tokenize=False,
                                               add_generation_prompt=True)
                 for p in prompts[start:start + args.batch_size]]
        batch = tokenizer(chats, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=100, do_sample=True, temperature=0.9, top_p=0.95,
                                 pad_token_id=tokenizer.eos_token_id)
        for row in out[:, batch.input_ids.shape[1]:]:
            for sentence in candidate_sentences(tokenizer.decode(row, skip_special_tokens=True)):
                key = re.sub(r"[^a-z ]", "", sentence.lower())
                if key not in seen:
                    seen.add(key)
                    kept.append(sentence)
        print(f"{min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts: {len(kept)} sentences", flush=True)
    Path(args.out).write_text("".join(s + "\n" for s in kept))
    print(f"wrote {len(kept)} sentences to {args.out}")


if __name__ == "__main__":
    main()
