"""peft_kernels.train.data: reading data files, tokenizing with the loss on responses only, batching.

Also home of :func:`tiny_tokenizer` (a word-level tokenizer with a ChatML template, built without any
download), which tests/test_trainer.py and tests/test_hf_trainers.py import.
"""
import json

import pytest
import torch

from peft_kernels.train.data import (IGNORE_INDEX, DataError, count_label_tokens, data_hash, load_records,
                                     make_batches, pack_examples, tokenize_record, tokenize_records)


pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the cat sat on a mat dog ran in park what is two plus four answer red blue green sky grass "
         "color of hello world user assistant system say").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(chat_template: bool = True):
    """A PreTrainedTokenizerFast over :data:`WORDS` (ids < 64, fits the tiny models' vocab of 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                eos_token="<eos>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        t.chat_template = CHATML
    return t


CHAT = {"messages": [{"role": "system", "content": "say hello"},
                     {"role": "user", "content": "what is two plus two"},
                     {"role": "assistant", "content": "four"},
                     {"role": "user", "content": "what color is the sky"},
                     {"role": "assistant", "content": "the sky is blue"}]}


def learned(tok, ids, labels):
    """The tokens with a label (the ones the loss counts), as text."""
    assert len(ids) == len(labels)
    kept = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert kept == [l for l in labels if l != IGNORE_INDEX]
    return tok.convert_ids_to_tokens(kept)


# ---------------------------------------------------------------------------- files
def test_load_jsonl_all_formats(tmp_path):
    recs = [{"text": "the cat sat"}, {"prompt": "what is", "completion": "four"},
            {"prompt": "what is", "response": "four"}, {"instruction": "say", "input": "hello", "output": "world"},
            CHAT]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")  # a trailing blank line is fine
    assert load_records(p) == recs
    pj = tmp_path / "d.json"
    pj.write_text(json.dumps(recs))
    assert load_records(pj) == recs


def test_load_text_blocks_and_lines(tmp_path):
    p = tmp_path / "blocks.txt"
    p.write_text("the cat sat\non a mat\n\n\nthe dog ran\n")
    assert load_records(p) == [{"text": "the cat sat\non a mat"}, {"text": "the dog ran"}]
    q = tmp_path / "lines.txt"
    q.write_text("the cat sat\nthe dog ran\n")
    assert load_records(q) == [{"text": "the cat sat"}, {"text": "the dog ran"}]


def test_load_datasets_dir_and_parquet(tmp_path):
    import datasets

    rows = [{"prompt": "what is", "completion": "four"}, {"prompt": "say", "completion": "hello"}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == rows
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(tmp_path / "d.parquet") == rows
    datasets.Dataset.from_list([{"foo": 1}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet.*row index 0.*unknown record format"):
        load_records(tmp_path / "bad.parquet")


def test_malformed_lines_named_with_line_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n'
                 '\n'
                 '{"text": "unterminated\n'         # line 3: invalid JSON
                 '[1, 2]\n'                         # line 4: not an object
                 '{"foo": "bar"}\n'                 # line 5: unknown format
                 '{"prompt": "x"}\n'                # line 6: no completion
                 '{"messages": [{"role": "user", "content": "hi"}]}\n'  # line 7: no assistant turn
                 '{"text": "fine"}\n')
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert str(p) in msg and "5 malformed line(s) at line 3, 4, 5, 6, 7" in msg
    assert "line 3: invalid JSON" in msg and "line 4: expected a JSON object" in msg
    assert "line 6: prompt record needs" in msg and "line 7: 'messages' has no assistant turn" in msg


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="unknown data file type '.bin'"):
        load_records(tmp_path / "x.bin")
    (tmp_path / "latin.txt").write_bytes(b"ok\nok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8 text \(line 3\)"):
        load_records(tmp_path / "latin.txt")
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 2"):
        load_records(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text('[{"text": "a"}, {"x": 1}]')
    with pytest.raises(DataError, match=r"list\.json: 1 malformed record\(s\) at record index 1: "
                                        r"record index 1: unknown record format"):
        load_records(tmp_path / "list.json")


# ---------------------------------------------------------------------------- tokenization
def test_chat_loss_on_assistant_turns_only():
    tok = tiny_tokenizer()
    ids, labels = tokenize_record(CHAT, tok)
    rendered = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    # both assistant turns with their end-of-turn token; nothing of system/user turns or role headers
    assert learned(tok, ids, labels) == ["four", "<|im_end|>", "the", "sky", "is", "blue", "<|im_end|>"]
    ids2, labels2 = tokenize_record(CHAT, tok, responses_only=False)
    assert ids2 == ids and labels2 == ids


def test_instruction_and_prompt_formats_through_template():
    tok = tiny_tokenizer()
    ids, labels = tokenize_record({"instruction": "say", "input": "hello", "output": "hello world"}, tok)
    assert tok.decode(ids) .startswith("<|im_start|> user say hello")
    assert learned(tok, ids, labels) == ["hello", "world", "<|im_end|>"]
    ids, labels = tokenize_record({"prompt": "what is two plus two", "completion": "four"}, tok)
    assert learned(tok, ids, labels) == ["four", "<|im_end|>"]


def test_without_chat_template():
    tok = tiny_tokenizer(chat_template=False)
    ids, labels = tokenize_record({"prompt": "what is two plus two", "completion": " four"}, tok)
    assert tok.convert_ids_to_tokens(ids) == ["what", "is", "two", "plus", "two", "four", "<eos>"]
    assert learned(tok, ids, labels) == ["four", "<eos>"]
    ids, labels = tokenize_record({"text": "the cat sat"}, tok)
    assert labels == ids and tok.convert_ids_to_tokens(ids)[-1] == "<eos>"
    with pytest.raises(DataError, match="record 0: a 'messages' record needs a tokenizer with a chat_template"):
        tokenize_records([CHAT], tok, 64)


def test_tokenize_records_chunks_text_and_truncates_chats():
    tok = tiny_tokenizer()
    long_text = " ".join(["the cat sat on a mat"] * 5)  # 30 words + eos = 31 tokens
    chat = {"messages": [{"role": "user", "content": "what is two plus two"},
                         {"role": "assistant", "content": "four is the answer red blue"}]}  # 18 tokens
    with pytest.warns(UserWarning, match="1 of 2 examples were longer than seq_len=12"):
        ex = tokenize_records([{"text": long_text}, chat], tok, 12)
    chunks = ex[:-1]
    assert [len(e["input_ids"]) for e in chunks] == [12, 12, 7]
    assert sum((e["input_ids"] for e in chunks), []) == tokenize_record({"text": long_text}, tok)[0]
    assert learned(tok, ex[-1]["input_ids"], ex[-1]["labels"]) == ["four", "is"]
    # a chat whose only assistant turn is truncated away leaves no label: dropped with a warning
    with pytest.warns(UserWarning) as caught, pytest.raises(DataError, match="no example with a label token"):
        tokenize_records([CHAT], tok, 4)
    assert any("had no label token after truncation" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        tokenize_records([CHAT], tok, 1)


# ---------------------------------------------------------------------------- batching
def _examples(n=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        L = 3 + i % 4
        ids = torch.randint(6, 60, (L,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (L // 2) + ids[L // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_padded_batches():
    ex = _examples()
    batches = list(make_batches(ex, 3, packing=False, pad_token_id=0, seed=1, epoch=0))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    seen = []
    for b in batches:
        for row, lab, mask, pos in zip(b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (row[n:] == 0).all() and (lab[n:] == IGNORE_INDEX).all()
            assert pos[:n].tolist() == list(range(n))
            seen.append(row[:n].tolist())
        assert int(b["num_tokens"]) == int(b["attention_mask"].sum())
    assert sorted(seen) == sorted(e["input_ids"] for e in ex)  # every example once
    again = list(make_batches(ex, 3, packing=False, pad_token_id=0, seed=1, epoch=0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = list(make_batches(ex, 3, packing=False, pad_token_id=0, seed=1, epoch=1))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    assert sum(count_label_tokens(b) for b in batches) == sum(
        sum(1 for l in e["labels"][1:] if l != IGNORE_INDEX) for e in ex)


def test_packed_batches():
    ex = _examples()
    batches = list(make_batches(ex, 2, packing=True, pad_token_id=0, seed=3, epoch=0, seq_len=10))
    assert all("attention_mask" not in b for b in batches)
    rows = pack_examples(ex, list(range(len(ex))), 10)
    assert all(len(r[0]) <= 10 for r in rows)
    # positions restart per example; the first label of every example is masked
    first = rows[0]
    starts = [i for i, p in enumerate(first[2]) if p == 0]
    assert starts[0] == 0 and len(starts) >= 2
    for s in starts:
        assert first[1][s] == IGNORE_INDEX
    assert sum(count_label_tokens(b) for b in batches) == sum(
        sum(1 for l in e["labels"][1:] if l != IGNORE_INDEX) for e in ex)
    assert sum(int(b["num_tokens"]) for b in batches) == sum(len(e["input_ids"]) for e in ex)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(make_batches(ex, 0, packing=True, pad_token_id=0, seed=0, epoch=0))


def test_data_hash_changes_with_data():
    ex = _examples()
    assert data_hash(ex) == data_hash([dict(e) for e in ex])
    ex2 = [dict(e) for e in ex]
    ex2[3] = {"input_ids": ex[3]["input_ids"], "labels": list(ex[3]["input_ids"])}
    assert data_hash(ex2) != data_hash(ex)
