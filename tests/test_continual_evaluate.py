"""Batches, greedy generation over right-padded rows, choice scoring, accuracy and perplexity,
checked against a scripted model with hand-known answers and against unpadded one-row forwards
(and Hugging Face's own generate/loss) of a random tiny Llama."""
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastcur.continual import ByteTokenizer, Example, accuracy, lm_batches, perplexity, predict, training_batch
from fastcur.continual.evaluate import answer_text, choice_scores, greedy_generate, model_logits
from tiny_models import byte_llama

TOK = ByteTokenizer()


class ScriptedLM(nn.Module):
    """After a scripted prompt, predicts its continuation then EOS; predicts EOS everywhere else.
    Asserts the rows it sees are right-padded."""

    def __init__(self, script: dict):
        super().__init__()
        self.script = [(TOK.encode(p), TOK.encode(c, add_bos=False, add_eos=True)) for p, c in script.items()]
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, **kwargs):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, TOK.vocab_size)
        for b in range(B):
            n = int(attention_mask[b].sum())
            assert attention_mask[b, :n].all() and not attention_mask[b, n:].any()
            ids = input_ids[b, :n].tolist()
            for t in range(n):
                nxt = TOK.eos_token_id
                for p, cont in self.script:
                    k = t + 1 - len(p)
                    if 0 <= k < len(cont) and ids[:len(p)] == p and ids[len(p):t + 1] == cont[:k]:
                        nxt = cont[k]
                logits[b, t, nxt] = 10.0
        return SimpleNamespace(logits=logits)


tiny_llama = functools.partial(byte_llama, intermediate_size=64, max_position_embeddings=256)


def test_answer_text_joins_with_one_space():
    assert answer_text("A:", "7") == " 7"
    assert answer_text("A: ", "7") == "7" and answer_text("A:\n", "7") == "7" and answer_text("A:", " 7") == " 7"


def test_training_batch_layout():
    exs = [Example("Q: 1+1?\nA:", "2"), Example("Hi:", "there")]
    b = training_batch(exs, TOK, max_len=64)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 14)
    for row, ex in enumerate(exs):
        p = TOK.encode(ex.prompt)
        full = p + TOK.encode(" " + ex.answer, add_bos=False, add_eos=True)
        assert b["prompt_lengths"][row] == len(p)
        assert b["input_ids"][row, :len(full)].tolist() == full
        assert (b["input_ids"][row, len(full):] == TOK.pad_token_id).all()
        assert b["attention_mask"][row].tolist() == [1] * len(full) + [0] * (14 - len(full))
        labelled = b["labels"][row][b["labels"][row] != -100].tolist()
        assert labelled == full[len(p):]  # answer and EOS only
    prompts = training_batch(exs, TOK, 64, include_answer=False)
    assert (prompts["labels"] == -100).all() and prompts["attention_mask"].sum(1).tolist() == [11, 4]
    # too long: the prompt loses its first tokens, the answer stays
    cut = training_batch([Example("x" * 50, "yes")], TOK, max_len=20)
    assert cut["input_ids"].shape == (1, 20) and TOK.decode(cut["input_ids"][0, -5:]) == " yes"
    with pytest.raises(ValueError, match="no room for the prompt"):
        training_batch([Example("p", "y" * 30)], TOK, max_len=20)


def test_lm_batches_cover_all_examples_in_order():
    exs = [Example(f"p{i}:", f"a{i}") for i in range(7)]
    batches = list(lm_batches(exs, TOK, batch_size=3, max_len=32))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    firsts = [TOK.decode(b["input_ids"][0]) for b in batches]
    assert firsts == ["p0: a0", "p3: a3", "p6: a6"]
    with pytest.raises(ValueError, match="batch_size"):
        list(lm_batches(exs, TOK, batch_size=0))
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        training_batch([("p", "a")], TOK)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_accuracy_exact_match_on_a_scripted_model(batch_size):
    exs = [Example("Q: 3+4?\nA:", "7"), Example("Q: 5-2?\nA:", "3"), Example("Q: 2+3?\nA:", "5"),
           Example("Q: 1+1?\nA:", "2"), Example("English: the red cat\nVel:", "la mika zor")]
    model = ScriptedLM({exs[0].prompt: " 7", exs[1].prompt: " 3\nmore text", exs[2].prompt: " 5 apples",
                        exs[3].prompt: "", exs[4].prompt: " la mika zor"})
    # cut at newline; the generation stops after answer length + 2 tokens; empty generation is wrong
    assert predict(model, exs, TOK, batch_size=batch_size) == ["7", "3", "5 a", "", "la mika zor"]
    assert accuracy(model, exs, TOK, batch_size=batch_size) == pytest.approx(3 / 5)
    assert accuracy(model, exs[:2], TOK, batch_size=batch_size) == 1.0


@pytest.mark.parametrize("use_model_generate", [False, True])
def test_greedy_generate_batched_equals_one_unpadded_row_at_a_time(use_model_generate):
    model = tiny_llama()
    prompts = [Example("a", "x"), Example("Q: Where does Zorvak live?\nA:", "x"), Example("Hello there:", "x")]
    batch = training_batch(prompts, TOK, 64, include_answer=False)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"])
    out = greedy_generate(*args, 6, [300], use_model_generate=use_model_generate)  # 300: a stop id never produced
    for row, ex in enumerate(prompts):
        ids = TOK.encode(ex.prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out[row] == ids[-6:]
    assert greedy_generate(*args, [1, 3, 2], [300], use_model_generate=use_model_generate) == [
        out[0][:1], out[1][:3], out[2][:2]]
    stop = out[1][2]  # stopping at a token includes it and ends only the rows that produced it
    stopped = greedy_generate(*args, 6, [stop], use_model_generate=use_model_generate)
    for row in range(3):
        k = out[row].index(stop) + 1 if stop in out[row] else 6
        assert stopped[row] == out[row][:k]


def test_choice_scores_match_one_row_log_likelihoods():
    model = tiny_llama(1)
    exs = [Example("Review: fun\nSentiment:", "positive", ("positive", "negative")),
           Example("Q: pick\nA:", "b", ("a", "b", "ccc"))]
    scores = choice_scores(model, exs, TOK, batch_size=2)
    for ex, got in zip(exs, scores):
        expected = []
        for c in ex.choices:
            p, a = TOK.encode(ex.prompt), TOK.encode(" " + c, add_bos=False)
            ids = torch.tensor([p + a])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            expected.append(sum(float(logp[len(p) - 1 + k, tok]) for k, tok in enumerate(a)))
        assert got == pytest.approx(expected, abs=1e-4)
        best = ex.choices[max(range(len(expected)), key=expected.__getitem__)]
        assert predict(model, [ex], TOK) == [best]
        assert accuracy(model, [ex], TOK) == float(best == ex.answer)


class _PlainLM(nn.Module):
    """A transformers model behind a plain module: choice_scores scores it one full row per choice."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_choice_scores_on_a_shared_prompt_cache_equal_one_row_per_choice(batch_size, monkeypatch):
    from fastcur.continual import evaluate

    shared, real = [], evaluate._shared_prompt_scores

    def spy(model, items, *args):
        shared.extend(i for i, _ in items)
        return real(model, items, *args)

    monkeypatch.setattr(evaluate, "_shared_prompt_scores", spy)
    model = tiny_llama(3)
    exs = [Example("Q: Where does Zorvak live?\nA:", "Plimt", ("Plimt", "Oss", "Vardenholm", "")),
           Example("Review: dull\nSentiment:", "negative", ("positive", "negative")),
           Example("x" * 40 + "\nAnswer:", "bb", ("aa", "bb")),         # cut by max_len: the same cut for both
           Example("y" * 45 + "\nAnswer:", "no", ("no", "a much longer choice")),   # cut differently per choice
           Example("Premise: all A are B.\nConclusion:", "yes", ("yes", "no", "maybe"))]
    got = choice_scores(model, exs, TOK, batch_size=batch_size, max_len=48)
    want = choice_scores(_PlainLM(model), exs, TOK, batch_size=batch_size, max_len=48)
    assert [len(g) for g in got] == [len(e.choices) for e in exs]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert got[0][3] == 0.0                                         # an empty choice has no tokens to score
    assert sorted(shared) == [0, 1, 2, 4]          # the cache for every example but the one cut per choice


def test_perplexity_uniform_model_is_vocab_size_and_matches_hf_loss():
    class Uniform(nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(*input_ids.shape, TOK.vocab_size)

    texts = ["Zorvak lives in Plimt.", "a", "Q: What job does Zorvak have?\nA: baker"]
    assert perplexity(Uniform(), texts, TOK, batch_size=2) == pytest.approx(TOK.vocab_size)
    model = tiny_llama(2)
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([TOK.encode(t, add_eos=True)])
        with torch.no_grad():
            nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    for bs in (1, 3):
        assert perplexity(model, texts, TOK, batch_size=bs) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_wrapper_with_prompt_lengths_gets_them_and_training_mode_is_restored():
    seen = []

    class Wrapper(nn.Module):  # the IMSM-style signature
        def __init__(self):
            super().__init__()
            self.inner = ScriptedLM({"Q:": " yes"})

        def forward(self, input_ids, attention_mask, prompt_lengths=None, labels=None):
            seen.append(prompt_lengths.tolist())
            return self.inner(input_ids, attention_mask).logits

    w = Wrapper().train()
    exs = [Example("Q:", "yes"), Example("Longer:", "nope", ("no", "nope"))]  # EOS-only: shorter wins
    assert accuracy(w, exs, TOK) == 0.5 and w.training
    assert [len(TOK.encode("Longer:"))] * 2 in seen and [len(TOK.encode("Q:"))] in seen
    logits = model_logits(w, *[training_batch(exs, TOK)[k] for k in ("input_ids", "attention_mask", "prompt_lengths")])
    assert logits.dtype == torch.float32 and logits.shape[-1] == TOK.vocab_size


def test_bad_input():
    model = ScriptedLM({})
    with pytest.raises(ValueError, match="examples is empty"):
        accuracy(model, [], TOK)
    with pytest.raises(ValueError, match="texts is empty"):
        perplexity(model, [], TOK)
    with pytest.raises(ValueError, match="max_new_tokens"):
        predict(model, [Example("a", "b")], TOK, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"logits of shape"):
        model_logits(lambda input_ids, attention_mask: torch.zeros(3), torch.zeros(1, 2, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.long))
