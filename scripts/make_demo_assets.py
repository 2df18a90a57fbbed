"""Build the demo model, tokenizer and data sets that ship in ``peft_kernels/assets/`` (no network).

What it makes, all from a seeded generator, so a rerun with the same arguments rebuilds the same
text and tokenizer (and, on the same torch build and thread count, the same weights):

* **A synthetic world**: 26 people, each with a home town, a job, a pet and a favourite colour,
  plus a few facts about the towns and jobs. The pretraining corpus is short documents about it
  written from sentence templates: paragraphs ("Alice lives in Amberly. Her pet is a cat. ...") and
  prose quizzes ("Question: Where is the home of Alice? Answer: Alice lives in Amberly.").
* **A tokenizer**: byte-level BPE (``tokenizers``) trained on that corpus (at most ``--vocab`` 1,024
  entries; the corpus fills about 700) with the special tokens ``<|bos|> <|end|> <|pad|> <|system|>
  <|user|> <|assistant|>``, a space put before every text segment (so a name is one and the same
  token at the start of an answer and inside a sentence), wrapped in
  ``transformers.PreTrainedTokenizerFast`` with a chat template that marks the assistant turns
  with ``{% generation %}`` (so ``return_assistant_tokens_mask`` works).
* **The base model**: a Llama-architecture causal LM (4 layers, hidden 128, 4 heads, 2 KV heads,
  MLP 384, tied embeddings; about 0.9 M parameters), pretrained from scratch on the corpus on the
  CPU for ``--steps`` steps and saved with ``save_pretrained`` (safetensors, bfloat16) together
  with the tokenizer in ``demo_model/``.
* **The fine-tuning task** ``demo_data.jsonl``: chat conversations asking about the world
  ("Where does Alice live?" -> "The home of Alice is in Amberly."), worded unlike the prose
  quizzes. The base model knows the facts and answers quizzes in plain text, but has never seen the chat template's
  role tokens, so it cannot answer a chat turn yet; ~100 LoRA steps teach it.
  ``demo_data_eval.jsonl`` asks the same questions about four people left out of the training
  conversations (they are in the pretraining text), to see whether the format generalises.
* ``demo_pretrain_eval.txt``: held-out pretraining documents (never trained on), one per blank-line
  separated block, for the "forgetting" metric: loss on the base model's own kind of text before
  and after fine-tuning.

    python scripts/make_demo_assets.py [--out peft_kernels/assets] [--steps 500] [--seed 0]

Takes about two minutes on 2 CPU cores with the default 500 steps (most of it pretraining).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "peft_kernels" / "assets"

# ---------------------------------------------------------------------------------------- the world
PEOPLE = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
          "Leo", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wendell",
          "Xenia", "Yusuf", "Zoe"]
# Pronouns so the prose reads naturally (and the model sees coreference, not just lists).
SHE = {"Alice", "Clara", "Elena", "Greta", "Ines", "Kira", "Maya", "Olga", "Rosa", "Tara", "Vera", "Xenia", "Zoe"}
TOWNS = ["Amberly", "Brightwater", "Coldharbor", "Dunmore", "Eastvale", "Fairhaven", "Greystone", "Highmoor",
         "Ironwood", "Juniper", "Kingsbridge", "Larkspur"]
TOWN_FACT = ["by the sea", "on a river", "in the hills", "near a forest", "in a valley", "on a lake",
             "by the sea", "in the mountains", "near a forest", "in the desert", "on a river", "in the hills"]
JOBS = ["baker", "farmer", "doctor", "teacher", "painter", "sailor", "tailor", "pilot", "nurse", "writer",
        "singer", "miner"]
JOB_FACT = ["bakes bread", "grows wheat", "helps the sick", "teaches children", "paints pictures",
            "sails ships", "sews clothes", "flies planes", "cares for patients", "writes books",
            "sings songs", "digs for gold"]
PETS = ["cat", "dog", "parrot", "horse", "rabbit", "goat", "turtle", "hamster"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
# People whose conversations are held out of the fine-tuning set (their facts are in the pretraining text).
HELD_OUT = ("Hugo", "Olga", "Umar", "Zoe")

SPECIAL = {"bos": "<|bos|>", "eos": "<|end|>", "pad": "<|pad|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Assistant turns sit inside {% generation %} so transformers can return the assistant-token mask;
# the turn's <|end|> is part of the response (the model must learn to stop).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_world(rng: random.Random) -> dict[str, dict[str, str]]:
    """Each person's town, job, pet and colour (a fixed draw from ``rng``)."""
    return {p: {"town": rng.choice(TOWNS), "job": rng.choice(JOBS), "pet": rng.choice(PETS),
                "colour": rng.choice(COLOURS)} for p in PEOPLE}


def _fact_sentences(rng: random.Random, name: str, f: dict[str, str]) -> list[tuple[str, str]]:
    """One (sentence naming the person, sentence with a pronoun) pair per fact, templates drawn from ``rng``."""
    he = "She" if name in SHE else "He"
    his = "Her" if name in SHE else "His"
    town, job, pet, colour = f["town"], f["job"], f["pet"], f["colour"]
    return [
        (rng.choice([f"{name} lives in {town}.", f"{name} has a house in {town}.", f"The home of {name} is in {town}.",
                     f"{name} moved to {town} long ago."]),
         rng.choice([f"{he} lives in {town}.", f"{his} home is in {town}."])),
        (rng.choice([f"{name} works as a {job}.", f"{name} is a {job}.", f"Every day {name} goes to work as a {job}."]),
         rng.choice([f"{he} works as a {job}.", f"{he} is a {job}."])),
        (rng.choice([f"{name} has a {pet}.", f"The pet of {name} is a {pet}."]),
         rng.choice([f"{his} pet is a {pet}.", f"{he} has a {pet} at home."])),
        (rng.choice([f"The favorite color of {name} is {colour}.", f"{name} likes the color {colour}."]),
         rng.choice([f"{his} favorite color is {colour}.", f"{he} likes the color {colour}."])),
    ]


def _world_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        i = rng.randrange(len(TOWNS))
        return rng.choice([f"{TOWNS[i]} is a town {TOWN_FACT[i]}.", f"The town of {TOWNS[i]} lies {TOWN_FACT[i]}."])
    i = rng.randrange(len(JOBS))
    return rng.choice([f"A {JOBS[i]} {JOB_FACT[i]}.", f"Every {JOBS[i]} {JOB_FACT[i]}."])


def make_paragraph(rng: random.Random, world: dict) -> str:
    """Two to four facts about one or two people, sometimes a fact about the world.

    The first sentence about a person names them; later ones mostly name them again (a quarter use a
    pronoun), so the model sees each fact bound to the name and learns to repeat the current subject."""
    sentences: list[str] = []
    for name in rng.sample(PEOPLE, rng.choice([1, 1, 2])):
        facts = _fact_sentences(rng, name, world[name])
        rng.shuffle(facts)
        chosen = facts[:rng.randint(2, 4)]
        sentences.append(chosen[0][0])
        sentences += [named if rng.random() < 0.75 else pronoun for named, pronoun in chosen[1:]]
    if rng.random() < 0.4:
        sentences.insert(rng.randint(0, len(sentences)), _world_sentence(rng))
    return " ".join(sentences)


#: The prose quizzes' questions and answers (deliberately not the chat data's wording).
PROSE_QUESTIONS = {
    "town": ("Where is the home of {n}?", "{n} lives in {v}."),
    "job": ("What work does {n} do?", "{n} works as a {v}."),
    "pet": ("Which pet lives with {n}?", "{n} has a {v}."),
    "colour": ("What color does {n} love?", "{n} likes the color {v}."),
}


def make_qa_document(rng: random.Random, world: dict) -> str:
    """A prose quiz about one person: "Question: Where is the home of Hugo? Answer: Hugo lives in Greystone."

    This is how the base model learns to answer a question about a person by repeating the name and
    stating the fact, in plain text; the chat format (special role tokens) it never sees."""
    name = rng.choice(PEOPLE)
    keys = rng.sample(list(PROSE_QUESTIONS), rng.randint(1, 3))
    return " ".join(f"Question: {PROSE_QUESTIONS[k][0].format(n=name)} Answer: "
                    f"{PROSE_QUESTIONS[k][1].format(n=name, v=world[name][k])}" for k in keys)


def make_document(rng: random.Random, world: dict) -> str:
    """One pretraining document: a paragraph of facts (75%) or a prose quiz (25%)."""
    return make_qa_document(rng, world) if rng.random() < 0.25 else make_paragraph(rng, world)


#: The chat data: two question forms per fact, one answer form. Each answer is a sentence form of the
#: pretraining prose that names the person after a few words ("The home of Hugo is in Greystone."):
#: the model learns to answer in the chat format by reusing what it knows (copy the name, state the
#: fact), which carries over to people whose conversations it never saw.
QUESTIONS = {
    "town": (["Where does {n} live?", "In which town does {n} live?"], "The home of {n} is in {v}."),
    "job": (["What does {n} do for a living?", "What is the job of {n}?"], "Every day {n} goes to work as a {v}."),
    "pet": (["What pet does {n} have?", "Which animal does {n} keep?"], "The pet of {n} is a {v}."),
    "colour": (["What is the favorite color of {n}?", "Which color does {n} like?"],
               "The favorite color of {n} is {v}."),
}


def make_conversations(world: dict, people) -> list[dict]:
    """Every question form about every fact of ``people``, as ``{"messages": [user, assistant]}``."""
    out = []
    for n in people:
        for key, (questions, answer) in QUESTIONS.items():
            for q in questions:
                out.append({"messages": [{"role": "user", "content": q.format(n=n)},
                                         {"role": "assistant", "content": answer.format(n=n, v=world[n][key])}]})
    return out


# ------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over ``texts`` wrapped as a transformers fast tokenizer (adds <|bos|> in front)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"], *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    # add_prefix_space: every text segment (also each one after a special token, as in "<|assistant|>Alice
    # lives...") starts with a space, so a word is the same token at the start of an answer as inside a
    # sentence: the model can copy the name from the question into the answer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                 pad_token=SPECIAL["pad"], extra_special_tokens=ROLE_TOKENS, add_prefix_space=True,
                                 model_max_length=256)
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ----------------------------------------------------------------------------------------- model
def build_model(tokenizer, *, layers: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pack(tokenizer, docs: list[str], seq_len: int):
    """All documents as one stream ``<|bos|> doc <|end|> <|bos|> doc <|end|> ...`` cut into rows [R, seq_len]."""
    import torch

    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // seq_len
    return torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)


def pretrain(model, rows, *, steps: int, batch: int, lr: float, seed: int, log_every: int = 50) -> list[float]:
    """Plain AdamW next-token training on packed rows (warmup then cosine decay). Returns the losses."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)

    def schedule(s: int) -> float:  # linear warmup, then cosine to zero
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x = rows[torch.randint(0, rows.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1:4d}/{steps}  loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


PROBES = {"town": "{n} lives in", "job": "{n} works as a", "pet": "The pet of {n} is a",
          "colour": "The favorite color of {n} is"}


def probe_facts(model, tokenizer, world: dict) -> tuple[int, int]:
    """How many facts the model completes correctly from a prose prompt (greedy): (right, asked)."""
    import torch

    right = asked = 0
    with torch.no_grad():
        for n, facts in world.items():
            for key, prompt in PROBES.items():
                ids = tokenizer(prompt.format(n=n), return_tensors="pt")["input_ids"]
                out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                right += text.strip().startswith(facts[key])
                asked += 1
    return right, asked


def eval_loss(model, rows) -> float:
    import torch

    with torch.no_grad():
        return sum(model(input_ids=r[None], labels=r[None]).loss.item() for r in rows) / len(rows)


# ------------------------------------------------------------------------------------------ main
def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets folder (default: peft_kernels/assets)")
    p.add_argument("--steps", type=int, default=500, help="pretraining steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--docs", type=int, default=6000, help="pretraining documents (5%% more are held out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    world = make_world(rng)
    n_eval = max(8, args.docs // 20)
    docs = [make_document(rng, world) for _ in range(args.docs + n_eval)]
    train_docs, eval_docs = docs[:args.docs], docs[args.docs:]
    train_people = [n for n in PEOPLE if n not in HELD_OUT]
    chats, held_out_chats = make_conversations(world, train_people), make_conversations(world, HELD_OUT)
    random.Random(args.seed + 1).shuffle(chats)

    # The tokenizer also sees the chat text, so questions tokenize as compactly as the prose.
    chat_texts = [m["content"] for c in chats + held_out_chats for m in c["messages"]]
    tokenizer = train_tokenizer(train_docs + chat_texts, args.vocab)
    model = build_model(tokenizer, layers=args.layers, hidden=args.hidden, seed=args.seed)
    n_params = sum(t.numel() for t in model.parameters())
    rows, eval_rows = pack(tokenizer, train_docs, args.seq_len), pack(tokenizer, eval_docs, args.seq_len)
    print(f"world: {len(PEOPLE)} people, {len(TOWNS)} towns, {len(JOBS)} jobs; corpus {len(train_docs)} documents "
          f"= {rows.numel():,} tokens; tokenizer vocab {len(tokenizer)}; model {n_params:,} parameters")
    print(f"pretraining {args.steps} steps x {args.batch} x {args.seq_len} tokens on {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    losses = pretrain(model, rows, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    held = eval_loss(model, eval_rows)
    right, asked = probe_facts(model, tokenizer, world)
    print(f"pretrained in {time.perf_counter() - t0:.0f} s: final train loss {losses[-1]:.3f}, "
          f"held-out loss {held:.3f}; completes {right}/{asked} facts from a prose prompt")

    out: Path = args.out
    model_dir = out / "demo_model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(out / "demo_data.jsonl", chats)
    write_jsonl(out / "demo_data_eval.jsonl", held_out_chats)
    (out / "demo_pretrain_eval.txt").write_text("\n\n".join(eval_docs) + "\n")
    (out / "world.json").write_text(json.dumps(
        {"people": world, "held_out": list(HELD_OUT), "seed": args.seed, "pretrain_steps": args.steps,
         "pretrain_final_loss": round(losses[-1], 4), "pretrain_heldout_loss": round(held, 4),
         "facts_known": f"{right}/{asked}"}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): demo_model/, demo_data.jsonl ({len(chats)} conversations), "
          f"demo_data_eval.jsonl ({len(held_out_chats)}), demo_pretrain_eval.txt ({len(eval_docs)} documents), "
          f"world.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
