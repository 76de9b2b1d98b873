"""Tiny Llama config, the pretraining loop, and the atomic, keyed cache of pretrained_base
(a handful of steps in a temporary cache folder)."""
import json
import os

import pytest
import torch

from fastcur.continual import ByteTokenizer, default_cache_dir, pretrain_info, pretrained_base, tiny_llama_config
from fastcur.continual import pretrain as P
from tiny_models import tiny_llama

pytest.importorskip("transformers")


def test_config_sizes():
    tiny, quick, full = (tiny_llama_config(259, s) for s in ("tiny", "quick", "full"))
    assert (quick.vocab_size, quick.hidden_size, quick.num_hidden_layers) == (259, 128, 2)
    assert full.hidden_size > quick.hidden_size > tiny.hidden_size
    assert full.num_hidden_layers > quick.num_hidden_layers
    assert (quick.pad_token_id, quick.bos_token_id, quick.eos_token_id) == (256, 257, 258)
    with pytest.raises(ValueError, match="size must be one of"):
        tiny_llama_config(259, "huge")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llama_config(0)


def test_pretrain_loop_learns_a_small_corpus():
    tok = ByteTokenizer()
    model = tiny_llama(0, vocab_size=259, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2)
    texts = ["Zorvak lives in Plimt.", "Q: Where does Zorvak live?\nA: Plimt"]
    log = P.pretrain(model, texts, tok, steps=40, batch_size=4, lr=1e-2, progress=False)
    assert len(log["losses"]) == 40 and log["seconds"] > 0
    assert sum(log["losses"][-5:]) / 5 < 0.5 * log["losses"][0]
    assert not model.training
    with pytest.raises(ValueError, match="steps"):
        P.pretrain(model, texts, tok, steps=0)


def test_packed_batch_holds_whole_texts():
    tok = ByteTokenizer()
    texts = ["abc", "defgh", "ij", "klmnopq"]  # 5, 7, 4, 9 tokens with bos and eos
    order = [0, 1, 2, 3, 0, 1]
    b = P._packed_batch(texts, order, tok, rows=2, seq_len=12)
    assert order == [3, 0, 1]  # consumed: 0, 1 (row 0: 12 tokens), 2 (row 1: 4 tokens; 3 does not fit)
    assert b["input_ids"].shape == (2, 12)
    assert tok.decode(b["input_ids"][0]) == "abcdefgh" and b["attention_mask"][0].all()
    assert b["input_ids"][0].tolist().count(tok.bos_token_id) == 2
    assert b["attention_mask"][1].tolist() == [1] * 4 + [0] * 8
    assert (b["labels"][1, 4:] == -100).all() and b["labels"][1, :4].tolist() == tok.encode("ij", add_eos=True)


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fastcur" / "continual"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == P.Path(os.path.expanduser("~")) / ".cache" / "fastcur" / "continual"


def test_cache_key_covers_every_setting_that_changes_the_weights(monkeypatch):
    from fastcur.continual import tasks as T

    key = P.cache_key(3, "quick", 7)
    assert key.startswith("quick-seed3-steps7-") and key == P.cache_key(3, "quick", 7)
    assert P.cache_key(3, "tiny", 7) != key and P.cache_key(4, "quick", 7) != key != P.cache_key(3, "quick", 8)
    assert P.cache_key(3, "quick").startswith(f"quick-seed3-steps{P.SIZES['quick']['steps']}-")
    settings = P.pretrain_settings(3, "quick", 7)
    assert settings["shape"]["lr"] == P.SIZES["quick"]["lr"] and settings["world"] == P.WORLD_VERSION
    # the recipe, the learning rate, the batch, the primers' generators, the world: each changes the key
    for target, name, value in ((P, "RECIPE", "other"), (P, "SEQ_LEN", 64), (P, "WORLD_VERSION", "x"),
                                (T, "GENERATOR_VERSION", "x")):
        monkeypatch.setattr(target, name, value)
        assert P.cache_key(3, "quick", 7) != key, name
        monkeypatch.undo()
    for option, value in (("lr", 1.0), ("batch_size", 3), ("hidden_size", 64), ("n_entities", 5)):
        monkeypatch.setitem(P.SIZES, "quick", {**P.SIZES["quick"], option: value})
        assert P.cache_key(3, "quick", 7) != key, option
        monkeypatch.undo()


def test_pretrained_base_is_deterministic_cached_atomically_and_reused(tmp_path, monkeypatch):
    a, tok = pretrained_base(tmp_path / "a", seed=1, size="tiny", steps=2, progress=False)
    assert isinstance(tok, ByteTokenizer) and not a.training
    folder = tmp_path / "a" / P.cache_key(1, "tiny", 2)
    assert sorted(os.listdir(tmp_path / "a")) == [folder.name]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask      # a plain folder, not mkdtemp's 0700
    info = json.loads((folder / "pretrain.json").read_text())
    assert info == pretrain_info(tmp_path / "a", seed=1, size="tiny", steps=2)
    assert (info["seed"], info["size"], info["steps"]) == (1, "tiny", 2)
    assert 0.0 <= info["probe_accuracy"] <= 1.0 and info["heldout_perplexity"] > 1.0
    assert info["parameters"] == sum(p.numel() for p in a.parameters())
    from fastcur.continual import accuracy, base_world

    world = base_world(1, "tiny")
    assert len(world.people) == P.SIZES["tiny"]["n_entities"]
    assert accuracy(a, world.probe(), tok, batch_size=64) == info["probe_accuracy"]  # the world it was measured on
    assert pretrain_info(tmp_path / "a", seed=2, size="tiny", steps=2) is None

    # same key: loaded from the cache, no training
    monkeypatch.setattr(P, "pretrain", lambda *args, **kwargs: pytest.fail("pretrained again"))
    again, _ = pretrained_base(tmp_path / "a", seed=1, size="tiny", steps=2, progress=False)
    for (name, p), q in zip(a.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    monkeypatch.undo()

    # same seed elsewhere: the same weights; another seed: different weights
    b, _ = pretrained_base(tmp_path / "b", seed=1, size="tiny", steps=2, progress=False)
    c, _ = pretrained_base(tmp_path / "b", seed=2, size="tiny", steps=2, progress=False)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert len(os.listdir(tmp_path / "b")) == 2
    with pytest.raises(ValueError, match="steps must be"):
        pretrained_base(tmp_path, steps=0)
