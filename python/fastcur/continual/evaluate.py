"""Batches for training, and the benchmark's three measurements: accuracy (greedy exact match, or
the likeliest of `choices`), and perplexity on held-out text.

Every model call goes through two small functions, `model_logits` (one forward) and
`greedy_generate` (a model's own KV-cached `generate` where it has one, else a loop of
`model_logits`), so any causal LM works: a `transformers` model, or a
wrapper such as IMSM's whose forward takes `(input_ids, attention_mask, prompt_lengths, labels)`
(`prompt_lengths` is passed when the forward accepts it) and returns logits or an object with
`.logits`.

Layout of every batch: rows are right-padded, row b holds `[bos] prompt answer [eos]` (as far as
present) from position 0, so positions need no correction and, under a causal mask, padding after
a row's tokens never affects them. Answers are joined to prompts with one space unless the prompt
ends in whitespace or the answer starts with it (`answer_text`).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence

import torch

from .._hf_compat import cache_keyword, new_cache
from .tasks import Example

DEFAULT_MAX_LEN = 256


def answer_text(prompt: str, answer: str) -> str:
    """The text that follows `prompt` when the model answers (a separating space where needed)."""
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return answer
    return " " + answer


def _encode(prompt: str, answer: str | None, tokenizer, max_len: int, add_eos: bool) -> tuple[list[int], int]:
    """Token ids of `prompt` (+ answer) and the prompt's length; the prompt loses its first tokens
    when the whole exceeds max_len."""
    p = tokenizer.encode(prompt, add_bos=True)
    a = [] if answer is None else tokenizer.encode(answer_text(prompt, answer), add_bos=False, add_eos=add_eos)
    if len(a) >= max_len:
        raise ValueError(f"max_len={max_len} leaves no room for the prompt: the answer {answer!r} alone "
                         f"has {len(a)} tokens")
    if len(p) + len(a) > max_len:
        p = p[len(p) + len(a) - max_len:]
    return p + a, len(p)


def _collate(seqs: list[list[int]], prompt_lengths: list[int], pad_id: int) -> dict:
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, prompt_lengths)):
        ids = torch.tensor(s, dtype=torch.long)
        input_ids[b, :len(s)] = ids
        attention_mask[b, :len(s)] = 1
        labels[b, n:len(s)] = ids[n:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long)}


def _check_examples(examples, name="examples") -> list[Example]:
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise TypeError(f"{name}[{i}] must be a fastcur.continual.Example, got {type(ex).__name__}")
    return examples


def training_batch(examples: Sequence[Example], tokenizer, max_len: int = DEFAULT_MAX_LEN,
                   include_answer: bool = True) -> dict:
    """One batch of `examples` (in order) as tensors, rows right-padded:

    input_ids, attention_mask, labels: [B, L] long; labels are -100 on the prompt and on padding,
    so the loss covers the answer tokens and the final EOS only; prompt_lengths: [B] long (tokens
    of BOS + prompt). include_answer=False gives the prompts alone (labels all -100).
    """
    examples = _check_examples(examples)
    if not examples:
        raise ValueError("examples is empty")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    seqs, lens = [], []
    for ex in examples:
        s, n = _encode(ex.prompt, ex.answer if include_answer else None, tokenizer, max_len, add_eos=True)
        seqs.append(s)
        lens.append(n)
    return _collate(seqs, lens, tokenizer.pad_token_id)


def lm_batches(examples: Sequence[Example], tokenizer, batch_size: int, max_len: int = DEFAULT_MAX_LEN,
               include_answer: bool = True) -> Iterator[dict]:
    """`training_batch` over consecutive slices of `examples` of `batch_size` (the last may be smaller)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    examples = _check_examples(examples)
    for start in range(0, len(examples), batch_size):
        yield training_batch(examples[start:start + batch_size], tokenizer, max_len, include_answer)


# ------------------------------------------------------------------ the two model calls
_ACCEPTS_PROMPT_LENGTHS: dict[type, bool] = {}


def _accepts_prompt_lengths(model) -> bool:
    kind = type(model)
    if kind not in _ACCEPTS_PROMPT_LENGTHS:
        try:
            params = inspect.signature(model.forward).parameters
            _ACCEPTS_PROMPT_LENGTHS[kind] = "prompt_lengths" in params
        except (TypeError, ValueError):
            _ACCEPTS_PROMPT_LENGTHS[kind] = False
    return _ACCEPTS_PROMPT_LENGTHS[kind]


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One forward: input_ids, attention_mask [B, L] (right-padded) -> logits [B, L, V] float32."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if prompt_lengths is not None and _accepts_prompt_lengths(model):
        kwargs["prompt_lengths"] = prompt_lengths
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"model returned logits of shape {getattr(logits, 'shape', None)}, expected "
                         f"[{input_ids.shape[0]}, {input_ids.shape[1]}, vocab]")
    return logits.float()


def _has_cached_generate(model) -> bool:
    """Whether `model.generate(input_ids=, attention_mask=, max_new_tokens=, eos_token_id=)` decodes
    greedily with a KV cache from left-padded rows: a `transformers` model, fastcur.IMSM, or a
    wrapper that declares it with `kv_cache_generate = True` (the benchmark's IMSM evaluation)."""
    if getattr(model, "kv_cache_generate", False):
        return True
    from ..imsm import IMSM

    return isinstance(model, IMSM) or _is_transformers_model(model)


def _is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "generate")


def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                    max_new_tokens: int | Sequence[int], stop_ids: Sequence[int],
                    use_model_generate: bool | None = None) -> list[list[int]]:
    """Greedy continuation of each right-padded prompt row.

    Stops a row at the first of `stop_ids` (included in its output) or after max_new_tokens (one
    int, or one per row). Returns the new token ids per row. A model with a KV-cached `generate`
    (`transformers` models, fastcur.IMSM; use_model_generate=None or True) decodes with it on the
    rows moved to left padding (positions from the mask); any other model runs a loop of
    `model_logits` without cache: row b's next token comes from the logits at its own last
    position and is written right after it, so rows of different lengths advance together.
    """
    B, L = input_ids.shape
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(limits) != B or min(limits) < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1 or {B} of them, got {max_new_tokens!r}")
    if use_model_generate is None:
        use_model_generate = _has_cached_generate(model)
    if use_model_generate:
        return _cached_greedy(model, input_ids, attention_mask, limits, stop_ids)
    max_new_tokens = max(limits)
    device = input_ids.device
    lengths = attention_mask.sum(1).long()
    buf = torch.zeros((B, L + max_new_tokens), dtype=input_ids.dtype, device=device)
    mask = torch.zeros_like(buf, dtype=attention_mask.dtype)
    buf[:, :L], mask[:, :L] = input_ids, attention_mask
    rows = torch.arange(B, device=device)
    stop = set(int(i) for i in stop_ids)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        end = int(lengths.max())
        logits = model_logits(model, buf[:, :end], mask[:, :end], prompt_lengths)
        nxt = logits[rows, lengths - 1].argmax(-1)
        active = torch.tensor([not d for d in done], device=device)
        buf[rows[active], lengths[active]] = nxt[active]
        mask[rows[active], lengths[active]] = 1
        lengths = lengths + active.long()
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                outputs[b].append(tok)
                done[b] = tok in stop or len(outputs[b]) >= limits[b]
        if all(done):
            break
    return outputs


def _cached_greedy(model, input_ids, attention_mask, limits: list[int], stop_ids: Sequence[int]) -> list[list[int]]:
    B, L = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if not isinstance(pad, int):  # any id in the vocabulary will do: padded positions are masked
        pad = int(input_ids[0, 0])
    left = torch.full_like(input_ids, pad)
    left_mask = torch.zeros_like(attention_mask)
    for b, n in enumerate(lengths):
        left[b, L - n:] = input_ids[b, :n]
        left_mask[b, L - n:] = 1
    kwargs = {"input_ids": left, "attention_mask": left_mask, "max_new_tokens": max(limits),
              "eos_token_id": [int(i) for i in stop_ids]}
    if hasattr(model, "config"):   # transformers: greedy, and the pad id it fills finished rows with
        kwargs.update(do_sample=False, num_beams=1, pad_token_id=pad)
    out = model.generate(**kwargs)
    stop = set(int(i) for i in stop_ids)
    outputs = []
    for b, row in enumerate(out[:, L:].tolist()):
        new: list[int] = []
        for tok in row[:limits[b]]:
            new.append(tok)
            if tok in stop:
                break
        outputs.append(new)
    return outputs


# ------------------------------------------------------------------ measurements
def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _EvalMode:
    """model.eval() and torch.no_grad() inside; restores the training flag after."""

    def __init__(self, model):
        self.model, self.was_training = model, getattr(model, "training", False)
        self.no_grad = torch.no_grad()

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.was_training and hasattr(self.model, "train"):
            self.model.train()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _stop_ids(tokenizer) -> list[int]:
    stop = [tokenizer.eos_token_id]
    newline = tokenizer.encode("\n", add_bos=False)
    if len(newline) == 1:
        stop.append(newline[0])
    return stop


def clean_generation(text: str) -> str:
    """The generated answer as compared: cut at the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def choice_scores(model, examples: Sequence[Example], tokenizer, batch_size: int = 32,
                  max_len: int = DEFAULT_MAX_LEN) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its prompt, per example (EOS not scored).

    A `transformers` model runs each prompt once and its choices on copies of the prompt's KV
    cache (`_shared_prompt_scores`); any other model, and an example whose choices cut its
    prompt differently (`max_len`), runs one full row per choice. Both give the same sums (up to
    float rounding: the cached rows attend to the same keys in another order of operations)."""
    examples = _check_examples(examples)
    encoded = [[_encode(ex.prompt, c, tokenizer, max_len, add_eos=False) for c in (ex.choices or ())]
               for ex in examples]
    scores: list[list[float]] = [[0.0] * len(e) for e in encoded]
    shared = [i for i, e in enumerate(encoded) if e and len({tuple(seq[:n]) for seq, n in e}) == 1]
    if not _is_transformers_model(model):
        shared = []
    rest = sorted(set(range(len(examples))) - set(shared))
    device = _device(model)
    with _EvalMode(model):
        _shared_prompt_scores(model, [(i, encoded[i]) for i in shared], batch_size, tokenizer.pad_token_id, device,
                              scores)
        pairs = [(i, c) for i in rest for c in range(len(encoded[i]))]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            seqs, lens = zip(*(encoded[i][c] for i, c in chunk))
            batch = _to(_collate(list(seqs), list(lens), tokenizer.pad_token_id), device)
            logp = torch.log_softmax(model_logits(model, batch["input_ids"], batch["attention_mask"],
                                                  batch["prompt_lengths"]), dim=-1)
            labels = batch["labels"][:, 1:]
            picked = logp[:, :-1].gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            totals = (picked * (labels != -100)).sum(1).tolist()
            for (i, c), total in zip(chunk, totals):
                scores[i][c] = total
    return scores


def _shared_prompt_scores(model, items: list[tuple[int, list[tuple[list[int], int]]]], batch_size: int,
                          pad_id: int, device, scores: list[list[float]]) -> None:
    """choice_scores for a `transformers` model: per chunk of examples (at most `batch_size`
    choice rows), one pass over the left-padded prompts with a KV cache, then one over every
    choice's tokens on its prompt's cache rows. items: (example index, [(ids, prompt length)
    per choice]) with one prompt per example; fills scores[i][c]."""
    start = 0
    while start < len(items):
        chunk, rows = [], 0
        while start < len(items) and (not chunk or rows + len(items[start][1]) <= batch_size):
            chunk.append(items[start])
            rows += len(items[start][1])
            start += 1
        prompts = [enc[0][0][:enc[0][1]] for _, enc in chunk]
        answers = [[seq[n:] for seq, n in enc] for _, enc in chunk]
        B, Lp = len(chunk), max(len(p) for p in prompts)
        ids = torch.full((B, Lp), pad_id, dtype=torch.long)
        mask = torch.zeros((B, Lp), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, Lp - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        kw = cache_keyword(type(model))
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **{kw: new_cache(model.config)})
        owner = [b for b, a in enumerate(answers) for _ in a]
        flat = [a for per in answers for a in per]
        index = torch.tensor(owner, dtype=torch.long, device=device)
        La = max(1, max(len(a) for a in flat))
        labels = torch.zeros((len(flat), La), dtype=torch.long)      # the answers' tokens, 0-padded
        valid = torch.zeros((len(flat), La), dtype=torch.bool)
        for j, a in enumerate(flat):
            labels[j, :len(a)] = torch.tensor(a, dtype=torch.long)
            valid[j, :len(a)] = True
        labels, valid = labels.to(device), valid.to(device)
        logits = out.logits[index, -1:]                              # [P, 1, V]: each answer's 1st token
        if La > 1:                          # the answers' tokens but the last, on their prompt's cache rows
            cache = getattr(out, kw)
            cache.batch_select_indices(index)
            a_pos = position_ids[index, -1:] + 1 + torch.arange(La - 1, device=device)
            out = model(input_ids=labels[:, :-1], attention_mask=torch.cat([mask[index], valid[:, :-1].long()], 1),
                        position_ids=a_pos, use_cache=True, **{kw: cache})
            logits = torch.cat([logits, out.logits], 1)              # [P, La, V]: row t predicts token t
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
        totals = iter((logp * valid).sum(1).tolist())               # one host sync per chunk
        for i, enc in chunk:
            scores[i] = [next(totals) for _ in enc]


def predict(model, examples: Sequence[Example], tokenizer, batch_size: int = 32, max_new_tokens: int | None = None,
            max_len: int = DEFAULT_MAX_LEN) -> list[str]:
    """The model's answer per example: the likeliest choice for examples with `choices`, else the
    greedy generation (cut at EOS/newline, stripped). max_new_tokens=None: the
    reference answer's token count + 2 per example (a longer generation cannot match anyway)."""
    examples = _check_examples(examples)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None or an int >= 1, got {max_new_tokens!r}")
    preds: list[str | None] = [None] * len(examples)
    scored = [i for i, ex in enumerate(examples) if ex.choices is not None]
    if scored:
        for i, s in zip(scored, choice_scores(model, [examples[i] for i in scored], tokenizer, batch_size, max_len)):
            preds[i] = examples[i].choices[max(range(len(s)), key=s.__getitem__)]
    free = [i for i, ex in enumerate(examples) if ex.choices is None]
    device, stop = _device(model), _stop_ids(tokenizer)
    with _EvalMode(model):
        for start in range(0, len(free), batch_size):
            idx = free[start:start + batch_size]
            chunk = [examples[i] for i in idx]
            n_new = [max_new_tokens or len(tokenizer.encode(answer_text(ex.prompt, ex.answer), add_bos=False)) + 2
                     for ex in chunk]
            batch = _to(training_batch(chunk, tokenizer, max_len - max(n_new), include_answer=False), device)
            outs = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"],
                                   n_new, stop)
            for i, ids in zip(idx, outs):
                if ids and ids[-1] == tokenizer.eos_token_id:
                    ids = ids[:-1]
                preds[i] = clean_generation(tokenizer.decode(ids))
    return preds  # type: ignore[return-value]


def accuracy(model, examples: Sequence[Example], tokenizer, batch_size: int = 32, max_new_tokens: int | None = None,
             max_len: int = DEFAULT_MAX_LEN) -> float:
    """Fraction of examples answered right: exact match of the stripped greedy generation with the
    stripped answer, or the likeliest choice being the answer for examples with `choices`."""
    examples = _check_examples(examples)
    if not examples:
        raise ValueError("examples is empty: accuracy needs at least one example")
    preds = predict(model, examples, tokenizer, batch_size, max_new_tokens, max_len)
    return sum(p == ex.answer.strip() for p, ex in zip(preds, examples)) / len(examples)


def perplexity(model, texts: Sequence[str], tokenizer, batch_size: int = 32, max_len: int = DEFAULT_MAX_LEN) -> float:
    """exp(mean negative log-likelihood per token) over `texts`, each encoded as [bos] text [eos]
    (cut to max_len tokens); every token after the first is predicted."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: perplexity needs at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    device = _device(model)
    total, count = 0.0, 0
    with _EvalMode(model):
        for start in range(0, len(texts), batch_size):
            seqs = [tokenizer.encode(t, add_bos=True, add_eos=True)[:max_len] for t in texts[start:start + batch_size]]
            batch = _to(_collate(seqs, [1] * len(seqs), tokenizer.pad_token_id), device)
            logp = torch.log_softmax(model_logits(model, batch["input_ids"], batch["attention_mask"]), dim=-1)
            labels = batch["labels"][:, 1:]
            valid = labels != -100
            picked = logp[:, :-1].gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total -= float((picked * valid).sum())
            count += int(valid.sum())
    return math.exp(total / count)
