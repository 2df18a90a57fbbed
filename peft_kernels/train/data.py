"""Training data: read records from files, tokenize them with the loss on responses only, batch them.

Three steps, each usable alone:

* :func:`load_records` reads JSON lines (``.jsonl``, or a ``.json`` file holding a list or one object
  per line), plain text (``.txt``/``.md``: one document per blank-line separated block, or per line when
  the file has no blank lines), or local ``datasets`` files (a ``save_to_disk`` directory, ``.parquet``,
  ``.arrow``, ``.csv``) into a list of dicts, checking every record's format. A malformed line raises
  :class:`DataError` naming the file and the 1-based line numbers of *all* bad lines (up to 20 shown).
* :func:`tokenize_records` turns records into ``{"input_ids": [...], "labels": [...]}`` with ``-100``
  labels on everything but the text the model should learn to produce (responses_only): formats
  ``{"text"}``, ``{"prompt", "completion"|"response"}``, ``{"instruction", "input"?, "output"}`` and
  ``{"messages": [{"role", "content"}, ...]}``. Instruction and chat records go through the tokenizer's
  chat template when it has one; the assistant spans are found as character ranges of the rendered text
  and mapped to tokens through the tokenizer's offsets, so the labels do not depend on how the template
  tokenizes at turn boundaries.
* :func:`make_batches` yields batches of tensors, shuffled per (seed, epoch): padded rows, or packed rows
  (padding-free: several examples concatenated into one row of at most ``seq_len`` tokens, with
  ``position_ids`` restarting at 0 for each example and no ``attention_mask`` so that transformers builds a
  block-diagonal causal mask from the position ids; examples never attend to each other).

Label convention: ``labels`` are aligned with ``input_ids`` (transformers' convention; the loss shifts
them). ``labels[i]`` is the target of position ``i - 1``, so ``labels[0]`` is never used; in packed rows
the first label of every example is set to -100 so that no example predicts the next one's first token.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
#: record formats, by the keys that identify them (checked in this order).
FORMATS = ("messages", "instruction", "prompt", "text")
_MAX_REPORTED = 20
_TEXT_SUFFIXES = (".txt", ".md", ".text")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and the 1-based line number(s)."""


# ============================================================================ records
def record_format(rec: Any) -> str:
    """The format of one record ("messages", "instruction", "prompt" or "text"); ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("'messages' has no assistant turn (nothing to learn)")
        return "messages"
    if "instruction" in rec:
        for k in ("instruction", "output"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"instruction record needs a string {k!r}")
        if not isinstance(rec.get("input", ""), str):
            raise ValueError("'input' must be a string")
        return "instruction"
    if "prompt" in rec:
        resp = rec.get("completion", rec.get("response"))
        if not isinstance(rec["prompt"], str) or not isinstance(resp, str):
            raise ValueError("prompt record needs string 'prompt' and 'completion' (or 'response')")
        return "prompt"
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ValueError("'text' must be a string")
        return "text"
    raise ValueError(f"unknown record format with keys {sorted(rec)[:8]}; expected one of "
                     f"{{'text'}}, {{'prompt','completion'}}, {{'instruction','input','output'}}, {{'messages'}}")


def _raise_bad(path: Path, bad: list[tuple[int, str]], what: str = "line") -> None:
    shown = "; ".join(f"{what} {n}: {msg}" for n, msg in bad[:_MAX_REPORTED])
    more = f" (and {len(bad) - _MAX_REPORTED} more)" if len(bad) > _MAX_REPORTED else ""
    nums = ", ".join(str(n) for n, _ in bad[:_MAX_REPORTED])
    raise DataError(f"{path}: {len(bad)} malformed {what.split()[0]}(s) at {what} {nums}{more}: {shown}")


def _read_json_lines(path: Path, text: str) -> list[dict]:
    records, bad = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((n, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            record_format(rec)
        except ValueError as e:
            bad.append((n, str(e)))
            continue
        records.append(rec)
    if bad:
        _raise_bad(path, bad)
    return records


def _read_json(path: Path, text: str) -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list of records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        bad = []
        for i, rec in enumerate(data):
            try:
                record_format(rec)
            except ValueError as e:
                bad.append((i, str(e)))
        if bad:
            _raise_bad(path, bad, what="record index")
        return list(data)
    return _read_json_lines(path, text)


def _read_text(path: Path, text: str) -> list[dict]:
    lines = text.splitlines()
    if any(not ln.strip() for ln in lines) and sum(1 for ln in lines if ln.strip()) > 0:
        docs, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln)
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
    else:
        docs = [ln for ln in lines if ln.strip()]
    return [{"text": d} for d in docs]


def _read_datasets(path: Path) -> list[dict]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
                ds = ds["train"]
        else:
            ds = datasets.load_dataset(_DATASETS_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read it as a datasets file: {type(e).__name__}: {e}") from None
    records, bad = [], []
    for i, rec in enumerate(ds):
        rec = {k: v for k, v in rec.items() if v is not None}
        try:
            record_format(rec)
        except ValueError as e:
            bad.append((i, str(e)))
            continue
        records.append(rec)
    if bad:
        _raise_bad(path, bad, what="row index")
    return records


def load_records(path: str | Path) -> list[dict]:
    """Records (dicts in one of the :data:`FORMATS`) from a data file or a local ``datasets`` directory.

    Raises FileNotFoundError for a missing path and :class:`DataError` for malformed content (naming the
    file and every bad line's 1-based number; the 0-based record/row index for a JSON list or a datasets
    file) or an empty file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in _DATASETS_SUFFIXES:
        records = _read_datasets(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{path}: not UTF-8 text (line {line}): {e.reason}") from None
        if suffix in (".jsonl", ".ndjson"):
            records = _read_json_lines(path, text)
        elif suffix == ".json":
            records = _read_json(path, text)
        elif suffix in _TEXT_SUFFIXES:
            records = _read_text(path, text)
        else:
            raise DataError(f"{path}: unknown data file type {suffix!r} (expected .jsonl, .json, .txt, .md, "
                            f".parquet, .arrow, .csv or a datasets directory)")
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ============================================================================ tokenization
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _to_messages(rec: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return rec["messages"]
    if fmt == "instruction":
        user = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    return [{"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec.get("completion", rec.get("response"))}]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of each assistant turn) through the chat template.

    Each assistant turn i spans from the end of ``render(messages[:i], generation prompt)`` to the end of
    ``render(messages[:i+1])``; both must be prefixes of the full rendering (templates that rewrite
    earlier turns, e.g. dropping past reasoning, are refused)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(start_text) or not full.startswith(end_text) or len(end_text) < len(start_text):
            raise ValueError("the chat template does not render conversations prefix-consistently; cannot find "
                             "the assistant turns (use responses_only=False)")
        spans.append((len(start_text), len(end_text)))
    return full, spans


def _encode_with_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool,
                       responses_only: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels: the ids where a token's characters lie in one of ``spans``."""
    if not responses_only:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return list(ids), list(ids)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        offsets = None
    if offsets is not None:
        ids = list(enc["input_ids"])
        labels = []
        for tok, (a, b) in zip(ids, offsets):
            # a token whose characters overlap an assistant span is a target
            inside = b > a and any(a < e and b > s for s, e in spans)
            labels.append(tok if inside else IGNORE_INDEX)
        return ids, labels
    # Slow tokenizer without offsets: encode the pieces separately (exact for templates whose turn
    # boundaries fall on token boundaries, which chat templates are written to ensure).
    ids, labels, pos = [], [], 0
    first = True
    for s, e in spans:
        pre = tokenizer(text[pos:s], add_special_tokens=add_special_tokens and first)["input_ids"]
        resp = tokenizer(text[s:e], add_special_tokens=False)["input_ids"]
        ids += pre + resp
        labels += [IGNORE_INDEX] * len(pre) + list(resp)
        pos, first = e, False
    tail = tokenizer(text[pos:], add_special_tokens=False)["input_ids"] if pos < len(text) else []
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


def _eos(tokenizer) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def tokenize_record(rec: dict, tokenizer, *, responses_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, untruncated; see :func:`tokenize_records`."""
    fmt = record_format(rec)
    eos = _eos(tokenizer)
    if fmt == "text":
        ids = list(tokenizer(rec["text"], add_special_tokens=True)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)
    if _has_chat_template(tokenizer):
        text, spans = _chat_spans(tokenizer, _to_messages(rec, fmt))
        return _encode_with_spans(tokenizer, text, spans, False, responses_only)
    if fmt == "messages":
        raise ValueError("a 'messages' record needs a tokenizer with a chat_template "
                         "(tokenizer.chat_template is not set)")
    # No template: plain "prompt + response" text, the response (and EOS) learned.
    if fmt == "instruction":
        prompt = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "") + "\n\n"
        response = rec["output"]
    else:
        prompt, response = rec["prompt"], rec.get("completion", rec.get("response"))
    text = prompt + response
    ids, labels = _encode_with_spans(tokenizer, text, [(len(prompt), len(text))], True, responses_only)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def tokenize_records(records: Sequence[dict], tokenizer, seq_len: int, *, responses_only: bool = True) -> list[dict]:
    """Tokenized examples ``{"input_ids": list[int], "labels": list[int]}`` (labels -100 where no loss).

    ``{"text"}`` documents are learned whole and split into chunks of ``seq_len`` tokens (nothing dropped);
    the other formats learn only the response / assistant turns (``responses_only=False``: every token)
    and are truncated to ``seq_len`` tokens. Examples left with no label token are dropped (a warning
    counts them). Raises :class:`DataError` naming the record index for a malformed record.
    """
    import warnings

    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    out, truncated, empty = [], 0, 0
    for i, rec in enumerate(records):
        try:
            fmt = record_format(rec)
            ids, labels = tokenize_record(rec, tokenizer, responses_only=responses_only)
        except ValueError as e:
            raise DataError(f"record {i}: {e}") from None
        if fmt == "text":
            pieces = [(ids[j:j + seq_len], labels[j:j + seq_len]) for j in range(0, len(ids), seq_len)]
        else:
            if len(ids) > seq_len:
                truncated += 1
            pieces = [(ids[:seq_len], labels[:seq_len])]
        for pi, pl in pieces:
            if sum(1 for t in pl[1:] if t != IGNORE_INDEX) == 0:
                empty += 1
                continue
            out.append({"input_ids": pi, "labels": pl})
    if truncated:
        warnings.warn(f"{truncated} of {len(records)} examples were longer than seq_len={seq_len} and were "
                      f"truncated", stacklevel=2)
    if empty:
        warnings.warn(f"{empty} example(s) had no label token after truncation and were dropped", stacklevel=2)
    if not out:
        raise DataError("no example with a label token (all responses were truncated away or empty)")
    return out


def data_hash(examples: Sequence[dict]) -> str:
    """SHA-256 (hex) of the tokenized examples: identifies a run's data for resume checks."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


# ============================================================================ batching
def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch`` (a fresh RNG: independent of the global random state)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def _pad_rows(rows: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, with_mask: bool) -> dict:
    width = max(len(r[0]) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (ids, lab, pos) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        labels[i, :n] = torch.tensor(lab)
        position_ids[i, :n] = torch.tensor(pos)
        # pads continue counting from 0 again: their own "example" in a packed row, never attended to.
        position_ids[i, n:] = torch.arange(width - n)
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "num_tokens": torch.tensor(sum(len(r[0]) for r in rows))}
    if with_mask:
        batch["attention_mask"] = mask
    return batch


def pack_examples(examples: Sequence[dict], order: Sequence[int], seq_len: int) -> list[tuple[list, list, list]]:
    """Rows (input_ids, labels, position_ids) of at most ``seq_len`` tokens: examples in ``order``, a new
    row when the next one does not fit; each example's first label is -100 and its positions restart at 0."""
    rows, cur = [], ([], [], [])
    for idx in order:
        ids, lab = examples[idx]["input_ids"][:seq_len], examples[idx]["labels"][:seq_len]
        if cur[0] and len(cur[0]) + len(ids) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend([IGNORE_INDEX] + list(lab[1:]))
        cur[2].extend(range(len(ids)))
    if cur[0]:
        rows.append(cur)
    return rows


def epoch_batches(examples: Sequence[dict], batch_size: int, *, packing: bool, pad_token_id: int, seed: int,
                  epoch: int, seq_len: int | None = None) -> list[dict]:
    """All batches of one epoch as a list (see :func:`make_batches`)."""
    return list(make_batches(examples, batch_size, packing=packing, pad_token_id=pad_token_id, seed=seed,
                             epoch=epoch, seq_len=seq_len))


def make_batches(examples: Sequence[dict], batch_size: int, *, packing: bool, pad_token_id: int, seed: int,
                 epoch: int, seq_len: int | None = None) -> Iterator[dict]:
    """Batches of one epoch, in an order fixed by (``seed``, ``epoch``).

    Padded (``packing=False``): ``batch_size`` examples per batch, right-padded to the longest with
    ``pad_token_id``; keys ``input_ids``, ``labels`` (-100 on pads), ``attention_mask``, ``position_ids``
    (all long ``[B, T]``).
    Packed (``packing=True``): examples concatenated into rows of at most ``seq_len`` tokens (default: the
    longest example), ``batch_size`` rows per batch; keys ``input_ids``, ``labels``, ``position_ids``
    (restarting at 0 per example) and no ``attention_mask`` (transformers then derives a block-diagonal
    causal mask from the position ids, so examples in a row never attend to each other).
    Both carry ``num_tokens`` (a 0-d long tensor: tokens other than padding). The last batch may be smaller.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not examples:
        raise ValueError("no examples to batch")
    order = _order(len(examples), seed, epoch)
    if packing:
        width = seq_len or max(len(e["input_ids"]) for e in examples)
        rows = pack_examples(examples, order, width)
    else:
        rows = [(examples[i]["input_ids"], examples[i]["labels"], list(range(len(examples[i]["input_ids"]))))
                for i in order]
    for start in range(0, len(rows), batch_size):
        yield _pad_rows(rows[start:start + batch_size], pad_token_id, with_mask=not packing)


def count_label_tokens(batch: dict) -> int:
    """Label tokens the loss counts in ``batch`` (shifted: ``labels[:, 1:] != -100``)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


__all__ = ["DataError", "IGNORE_INDEX", "FORMATS", "record_format", "load_records", "tokenize_record",
           "tokenize_records", "data_hash", "make_batches", "epoch_batches", "pack_examples", "count_label_tokens"]
