"""Sampling for the regulariser: pure temperature-1 sampling, seeded, with the prompt prefilled once."""

import pytest
import torch

from softpo.config import TinyModelConfig
from softpo.models import build_tiny_model, byte_tokenizer
from softpo.sampling import pure_sampling_config, sample, to_rows
from softpo.collate import left_pad


def setup():
    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, seed=0).eval()
    ids, mask = left_pad([list(b"How was the soup?"), list(b"Hi")], tok.pad_token_id)
    return tok, model, ids, mask


def assert_same_as_generate(got, model, tok, ids, mask, max_new_tokens: int,
                            num_prompts: int) -> None:
    """`got` (k=3, seed 5) holds exactly the rows generate(num_return_sequences=3) draws."""
    config = pure_sampling_config(model, tok, max_new_tokens, 3)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    want = to_rows(seq, mask.repeat_interleave(3, 0), config.eos_token_id, tok.pad_token_id,
                   num_prompts, 3)
    assert torch.equal(got.rows.input_ids, want.rows.input_ids)
    assert torch.equal(got.rows.response_mask, want.rows.response_mask)


def test_shared_prompt_prefill_reproduces_plain_generate():
    """Prefilling each prompt once and repeating its cache k times draws exactly the samples that
    generate(num_return_sequences=k) draws with the same seed."""
    tok, model, ids, mask = setup()
    got = sample(model, tok, ids, mask, k=3, max_new_tokens=12, seed=5)
    assert_same_as_generate(got, model, tok, ids, mask, 12, 2)


def test_sampling_is_pure_seeded_and_leaves_rng_alone():
    tok, model, ids, mask = setup()
    config = pure_sampling_config(model, tok, 8, 2)
    assert (config.temperature, config.top_k, config.top_p, config.repetition_penalty) == \
        (1.0, 0, 1.0, 1.0)
    state = torch.random.get_rng_state()
    a = sample(model, tok, ids, mask, k=2, max_new_tokens=8, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b = sample(model, tok, ids, mask, k=2, max_new_tokens=8, seed=1)
    c = sample(model, tok, ids, mask, k=2, max_new_tokens=8, seed=2)
    assert torch.equal(a.rows.input_ids, b.rows.input_ids)
    assert not torch.equal(a.rows.input_ids, c.rows.input_ids)
    # rows are [prompt, response, pad]: prompts start at 0, responses follow them
    assert a.rows.response_mask.sum(1).tolist() == a.response_lengths.tolist()
    assert bool((a.rows.input_ids[0, :17] == torch.tensor(list(b"How was the soup?"))).all())


def test_response_ends_at_first_eos():
    eos, pad = 9, 0
    seq = torch.tensor([[pad, 5, 6, 7, eos, 3, eos], [5, 5, 6, 1, 2, 3, 4]])  # prompt width 3
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rows = to_rows(seq, mask, [eos], pad, 2, 1)
    assert rows.response_lengths.tolist() == [2, 4]
    assert rows.finished.tolist() == [True, False]
    assert rows.rows.input_ids[0, :4].tolist() == [5, 6, 7, eos]


def test_the_sample_command_writes_one_object_per_sample(tmp_path, capsys):
    """`softpo sample tiny --out FILE.jsonl`: prompt-major rows {prompt, response, finished,
    tokens} equal to sample_prompts' texts, EOS flags and lengths with the same seed; nothing on
    stdout. A file name not ending in .jsonl is a one-line error."""
    import json

    from softpo.cli import main
    from softpo.commands import _prompt_config
    from softpo.config import DataConfig, ModelConfig
    from softpo.models import load_model, load_tokenizer
    from softpo.sampling import sample_prompts

    out = tmp_path / "samples.jsonl"
    assert main(["sample", "tiny", "--prompt", "hi", "--prompt", "How was the soup?", "-n", "3",
                 "--max-new-tokens", "6", "--seed", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    model = load_model(ModelConfig(name_or_path="tiny"), tok, seed=4)
    batch = sample_prompts(model, tok, ["hi", "How was the soup?"], _prompt_config(DataConfig.max_prompt_length),
                           3, 6, 4)
    assert [r["prompt"] for r in rows] == ["hi"] * 3 + ["How was the soup?"] * 3
    assert [r["response"] for r in rows] == batch.texts(tok)
    assert [r["finished"] for r in rows] == batch.finished.tolist()
    assert [r["tokens"] for r in rows] == batch.response_lengths.tolist()
    assert all(1 <= r["tokens"] <= 6 for r in rows)
    assert main(["sample", "tiny", "--prompt", "hi", "--out", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("room", [None, 0])  # sample()'s room for the new tokens; none: grown
def test_reserved_cache_draws_what_generate_draws(monkeypatch, arch, room):
    """The repeated prompt cache lives in buffers with room for the new tokens (no concatenation
    per token); generate() through it draws exactly what plain generate() draws, also when the
    buffers must grow."""
    import softpo.sampling as sampling

    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=2, n_embd=32, n_head=2, architecture=arch),
                             tok, seed=0).eval()
    ids, mask = left_pad([list(b"How was the soup?"), list(b"Hi"), list(b"abc")], tok.pad_token_id)
    caches = []
    shared = sampling.shared_prompt_cache

    def spy(gen, prompt_ids, prompt_mask, k, given_room=0):
        caches.append(shared(gen, prompt_ids, prompt_mask, k, given_room if room is None else room))
        return caches[-1]

    monkeypatch.setattr(sampling, "shared_prompt_cache", spy)
    got = sample(model, tok, ids, mask, k=3, max_new_tokens=20, seed=5)
    layer = caches[0].layers[0]
    assert type(layer).__name__ == "_ReservedLayer" and layer.keys.shape[0] == 9
    assert layer.keys.data_ptr() == layer._k.data_ptr()  # a view of the buffer, not a copy
    assert_same_as_generate(got, model, tok, ids, mask, 20, 3)
