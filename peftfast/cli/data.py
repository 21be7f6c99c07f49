"""Datasets for ``peftfast train``: loading, tokenization, packing, held-out split and batching.

Formats:
    * ``.txt`` (or anything not ``.jsonl``): the whole text is tokenized once and packed into
      non-overlapping ``seq_len`` windows; the loss is on every token.
    * ``.jsonl``: one JSON object per line, either ``{"text": ...}`` (loss on every token),
      ``{"prompt": ..., "completion": ...}`` (labels are -100 on the prompt tokens, so the loss is on the
      completion only), or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (a chat, rendered with
      the tokenizer's chat template; the loss is on the assistant turns only). Examples are truncated to
      ``seq_len`` and padded per batch, or with ``--packing`` concatenated into rows of up to ``seq_len``
      (:func:`pack_examples`; the held-out split is made first and stays one example per row).

Chat without a chat template (the built-in byte tokenizer, or a transformers tokenizer that has none)
uses peftfast's own template, every turn being::

    <|system|>\n{content}\n        <|user|>\n{content}\n        <|assistant|>\n{content}\n<EOS>

after one BOS; the loss covers each assistant turn's ``{content}\n<EOS>`` (EOS is the tokenizer's
end-of-sequence *token*, id 256 for the byte tokenizer). With a chat template, turn ``i``'s trained span
is ``render(messages[:i + 1])`` minus ``render(messages[:i], add_generation_prompt=True)``, so the
template's own end-of-turn marker is learned too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

IGNORE_INDEX = -100
BYTE_BOS = 256  # the byte tokenizer's BOS = EOS = PAD id, one past the 256 byte values


class DataError(ValueError):
    """A data file that cannot be used (malformed line, empty dataset, ...)."""


@dataclass
class Tokenizer:
    """What the trainer needs from a tokenizer.

    ``encode(text, add_bos)`` returns token ids; ``eos_id``/``pad_id`` may be None.
    """

    encode: Callable[[str, bool], list]
    eos_id: Optional[int]
    pad_id: int
    render_chat: Optional[Callable[[list, bool], str]] = None  # (messages, add_generation_prompt) -> text
    decode: Optional[Callable[[list], str]] = None  # ids -> text, special ids dropped


def byte_tokenizer() -> Tokenizer:
    """The UTF-8 byte tokenizer of the embedded tiny Llama (BOS = EOS = PAD = 256): the only one in peftfast.

    Example:
        >>> byte_tokenizer().decode(byte_tokenizer().encode("hé"))
        'hé'
    """

    def encode(text: str, add_bos: bool = True) -> list:
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS] + ids if add_bos else ids

    def decode(ids) -> str:
        return bytes(i for i in ids if i < BYTE_BOS).decode("utf-8", errors="replace")

    return Tokenizer(encode=encode, eos_id=BYTE_BOS, pad_id=BYTE_BOS, decode=decode)


def hf_tokenizer(tok) -> Tokenizer:
    """Wrap a transformers tokenizer."""

    def encode(text: str, add_bos: bool = True) -> list:
        return list(tok(text, add_special_tokens=add_bos)["input_ids"])

    render = None
    if getattr(tok, "chat_template", None):
        def render(messages: list, add_generation_prompt: bool) -> str:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Tokenizer(encode=encode, eos_id=tok.eos_token_id, pad_id=pad if pad is not None else 0, render_chat=render)


def prompt_completion_example(tokenizer: Tokenizer, prompt: str, completion: str, seq_len: int) -> dict:
    """Tokenize a prompt/completion pair; the prompt tokens get label -100.

    Example:
        >>> ex = prompt_completion_example(byte_tokenizer(), "Q: ", "A", 16)
        >>> ex["labels"]
        [-100, -100, -100, -100, 65, 256]
    """
    p = tokenizer.encode(prompt, True)
    c = tokenizer.encode(completion, False)
    if tokenizer.eos_id is not None:
        c = c + [tokenizer.eos_id]
    ids = (p + c)[:seq_len]
    labels = ([IGNORE_INDEX] * len(p) + c)[:seq_len]
    return {"input_ids": ids, "labels": labels}


def text_example(tokenizer: Tokenizer, text: str, seq_len: int) -> dict:
    ids = tokenizer.encode(text, True)
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    ids = ids[:seq_len]
    return {"input_ids": ids, "labels": list(ids)}


CHAT_ROLES = ("system", "user", "assistant")


def builtin_chat_text(messages: list, add_generation_prompt: bool = False) -> str:
    """peftfast's chat template as text (the EOS token after each assistant turn is not text: see
    :func:`chat_example`).

    Example:
        >>> builtin_chat_text([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        '<|user|>\\nhi\\n<|assistant|>\\n'
    """
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def check_messages(messages) -> Optional[str]:
    """What is wrong with a ``messages`` value, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string 'role' and 'content', got {json.dumps(m)[:80]}"
        if m["role"] not in CHAT_ROLES:
            return f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    return None


def _chat_segments(tokenizer: Tokenizer, messages: list) -> list:
    """[(ids, trained)] pieces whose concatenation is the whole conversation."""
    if tokenizer.render_chat is None:
        segs = []
        first = True
        for m in messages:
            header = tokenizer.encode(f"<|{m['role']}|>\n", first)
            first = False
            if m["role"] == "assistant":
                body = tokenizer.encode(m["content"] + "\n", False)
                if tokenizer.eos_id is not None:
                    body = body + [tokenizer.eos_id]
                segs += [(header, False), (body, True)]
            else:
                segs.append((header + tokenizer.encode(m["content"] + "\n", False), False))
        return segs
    render = tokenizer.render_chat
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True) if i else ""
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as the extension of its beginning "
                "(e.g. it rewrites earlier turns), so assistant turns cannot be located; use prompt/completion lines"
            )
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    final = render(messages, False)
    if not final.startswith(done):
        raise ValueError("the tokenizer's chat template renders the whole conversation differently from its turns")
    pieces.append((final[len(done):], False))
    return [(tokenizer.encode(text, False) if text else [], trained) for text, trained in pieces]


def chat_example(tokenizer: Tokenizer, messages: list, seq_len: int) -> dict:
    """Tokenize a conversation; labels are -100 everywhere but on the assistant turns.

    Example:
        >>> ex = chat_example(byte_tokenizer(), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 64)
        >>> [t for t in ex["labels"] if t != -100]
        [98, 10, 256]
    """
    ids, labels = [], []
    for seg, trained in _chat_segments(tokenizer, messages):
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return {"input_ids": ids[:seq_len], "labels": labels[:seq_len]}


def pack_text(tokenizer: Tokenizer, text: str, seq_len: int) -> list:
    """Tokenize ``text`` once and cut it into non-overlapping ``seq_len`` windows (a short tail is kept
    only when it is the only window)."""
    ids = tokenizer.encode(text, True)
    windows = [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)]
    if len(windows) > 1 and len(windows[-1]) < seq_len:
        windows.pop()
    return [{"input_ids": w, "labels": list(w)} for w in windows if len(w) >= 2]


def pack_examples(examples: list, seq_len: int) -> list:
    """Concatenate whole examples, in order, into rows of at most ``seq_len`` tokens (``--packing``).

    An example is never split; each keeps its own labels (a prompt stays masked), and its first token's
    label is -100, so no row learns to predict one example's start from the example before it. Examples
    in one row attend to each other (as TRL's classic packing): fewer pad tokens, much faster training on
    short examples, slightly different context than training them one per row.

    Example:
        >>> rows = pack_examples([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 4)
        >>> rows[0]["input_ids"], rows[0]["labels"]
        ([1, 2, 3], [-100, 2, -100])
    """
    rows, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex["input_ids"]) > seq_len:
            rows.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids.extend(ex["input_ids"])
        labels.extend([IGNORE_INDEX, *ex["labels"][1:]])
    if ids:
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _decoded_lines(path: Path):
    """(line number, text) of a UTF-8 file; invalid UTF-8 or NUL bytes (a binary file) are a DataError that
    names the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode_line(path, lineno, raw)


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    if b"\0" in raw:
        raise DataError(f"{path}:{lineno}: holds NUL bytes; this is a binary file, not UTF-8 text or jsonl")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def _read_text(path: Path) -> str:
    text = "".join(text for _, text in _decoded_lines(path))
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode's universal newlines did


def load_jsonl(tokenizer: Tokenizer, path: Path, seq_len: int) -> list:
    examples, skipped = [], 0
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            problem = check_messages(obj["messages"])
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            try:
                ex = chat_example(tokenizer, obj["messages"], seq_len)
            except DataError:
                raise
            except Exception as e:  # a chat template that fails on this conversation
                raise DataError(f"{path}:{lineno}: cannot render the chat: {e}") from None
        elif "prompt" in obj or "completion" in obj:
            p, c = obj.get("prompt"), obj.get("completion")
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError(f"{path}:{lineno}: 'prompt' and 'completion' must both be strings")
            ex = prompt_completion_example(tokenizer, p, c, seq_len)
        elif "text" in obj:
            if not isinstance(obj["text"], str):
                raise DataError(f"{path}:{lineno}: 'text' must be a string")
            ex = text_example(tokenizer, obj["text"], seq_len)
        else:
            raise DataError(f"{path}:{lineno}: expected a 'text' field, 'prompt' and 'completion' fields, or "
                            f"'messages', got keys {sorted(obj)}")
        if len(ex["input_ids"]) < 2 or all(x == IGNORE_INDEX for x in ex["labels"][1:]):
            skipped += 1  # nothing to learn from (e.g. the prompt fills seq_len)
            continue
        examples.append(ex)
    if skipped:
        print(f"note: {skipped} example(s) of {path} have no trained token within --seq-len {seq_len}; skipped")
    return examples


def load_dataset(path, tokenizer: Tokenizer, seq_len: int) -> list:
    """Load ``path`` (.txt or .jsonl) into a list of ``{"input_ids", "labels"}`` examples.

    Raises:
        DataError: missing file, malformed jsonl (with the line number), or no usable example.
    """
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        examples = load_jsonl(tokenizer, path, seq_len)
    else:
        text = _read_text(path)
        examples = pack_text(tokenizer, text, seq_len) if text.strip() else []
    if not examples:
        raise DataError(f"dataset {path} is empty: no training example could be made from it")
    return examples


def split(examples: list, eval_fraction: float, seed: int) -> tuple:
    """Shuffle and hold out ``eval_fraction`` (at least one example). With a single example, it is used
    for both training and evaluation."""
    if len(examples) == 1:
        return list(examples), list(examples)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, math.ceil(len(examples) * eval_fraction)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad to the longest example; padded labels are -100 and masked in ``attention_mask``.

    The first label of every row is -100 too: causal LMs never predict the first token (labels are
    shifted by one), except under prompt tuning, where the model puts virtual tokens in front and the
    last one would be trained to predict the first real token (PEFT's behaviour); masking it keeps the
    loss on the same tokens for every method.
    """
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def iterate_batches(examples: list, batch_size: int, pad_id: int, seed: int, shuffle: bool = True, skip: int = 0):
    """Endless iterator of (epoch, batch): reshuffled every epoch (the order depends only on ``seed`` and
    the epoch). ``skip`` batches are passed over without being built (resuming a run)."""
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, start = divmod(skip, per_epoch)
    while True:
        order = list(range(len(examples)))
        if shuffle:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(start * batch_size, len(order), batch_size):
            yield epoch, collate([examples[j] for j in order[i: i + batch_size]], pad_id)
        epoch, start = epoch + 1, 0
