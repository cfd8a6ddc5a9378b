"""Fresh samples from the policy: the only caller of `generate()` in softpo.

The global KL regulariser is an expectation under the model's *own* distribution, so samples are drawn
at temperature 1 with no top-k, top-p or repetition penalty (anything else estimates the KL of another
distribution), with the KV cache, `k >= 2` samples per prompt, and a seed per call so that a resumed
run draws exactly the samples the uninterrupted run drew. A `temperature` other than 1 (offered for
evaluation only, `softpo eval --temperature`) samples from softmax(logits / temperature) instead.

Samples come back as right-padded rows `[prompt, response, pad]` (the layout of preference rows), the
response masked up to and including the first end-of-sequence token. `sample_prompts` samples after
prompts given as text or conversations, encoded by the one prompt encoder
(`softpo.collate.encode_prompt`) that training uses, so a sample is trained after exactly the tokens
it was drawn after.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from softpo.collate import prompt_batch
from softpo.config import DataConfig
from softpo.models import hf_model
from softpo.packing import Rows


@dataclass
class SampleBatch:
    """k fresh responses for each of P prompts, as right-padded rows (prompt-major)."""

    rows: Rows  # (P*k, T) right-padded prompt + response; response_mask on sampled tokens
    num_prompts: int  # P
    samples_per_prompt: int  # k
    response_lengths: Tensor  # (P*k,) sampled tokens per row (EOS included when reached)
    finished: Tensor  # (P*k,) bool: the response ended with EOS before max_new_tokens

    def texts(self, tokenizer) -> list[str]:
        """The responses decoded, special tokens skipped, in row order."""
        out = []
        for ids, mask in zip(self.rows.input_ids, self.rows.response_mask):
            out.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
        return out


def pure_sampling_config(model: nn.Module, tokenizer, max_new_tokens: int, k: int,
                         temperature: float = 1.0):
    """A GenerationConfig that samples from the model's own distribution (no truncation), at
    `temperature` 1; another temperature samples from softmax(logits / temperature)."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                            typical_p=1.0, repetition_penalty=1.0, num_beams=1,
                            num_return_sequences=k, max_new_tokens=max_new_tokens,
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(hf_model(model), "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, k: int,
           max_new_tokens: int, seed: int, temperature: float = 1.0) -> SampleBatch:
    """Draw k responses for each left-padded prompt.  prompt_ids, prompt_mask: (P, Lp).

    Each prompt is run through the model once; its KV cache is then repeated for the k samples
    (generate() alone would run the prompt k times, which dominates when prompts are long), into
    buffers with room for the new tokens (`reserved_layer`: no copy of the whole cache per token).
    """
    inner = hf_model(model)
    was_training = inner.training
    inner.eval()  # no dropout while sampling
    config = pure_sampling_config(model, tokenizer, max_new_tokens, k, temperature)
    config.num_return_sequences = 1
    ids, mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
    gen = generation_model(model)
    cache = shared_prompt_cache(gen, prompt_ids, prompt_mask, k, max_new_tokens + 1)
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        extra = {"past_key_values": cache} if cache is not None else {}
        sequences = gen.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 **extra)  # (P*k, Lp+new)
    inner.train(was_training)
    return to_rows(sequences, mask, config.eos_token_id, tokenizer.pad_token_id,
                   prompt_ids.shape[0], k)


def shared_prompt_cache(gen: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, k: int,
                        room: int = 0):
    """KV cache of all prompt tokens but the last, computed once per prompt and repeated k times,
    each plain layer with `room` free positions (`reserved_layer`); None when the model's cache
    cannot be repeated (generate() then prefills as usual). The prefill computes no logits."""
    if k == 1 or prompt_ids.shape[1] < 2:
        return None
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)[:, :-1]
    last_only = {"logits_to_keep": 1} if _takes(gen, "logits_to_keep") else {}
    out = gen(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
              position_ids=position_ids, use_cache=True, **last_only)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized
                         for layer in layers):
        cache.batch_repeat_interleave(k)
        return cache
    cache.layers = [reserved_layer(layer, k, room) for layer in layers]
    return cache


def _takes(gen: nn.Module, name: str) -> bool:
    """Whether the HF model under `gen` takes the keyword `name` in forward."""
    import inspect

    return name in inspect.signature(hf_model(gen).forward).parameters


@functools.cache
def _reserved_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class _ReservedLayer(DynamicLayer):
        """A plain (DynamicLayer) cache layer whose keys and values live in buffers with room for
        more positions: `update` writes the new positions in place and returns views of the filled
        part, the same values `torch.cat` would return, without copying the whole cache at every
        generated token (on the CPU benchmark's 8 rows of about 150 positions: a sixth to a
        quarter of sampling's time)."""

        def __init__(self, layer: DynamicLayer, k: int, room: int):
            super().__init__()
            B, H, L, D = layer.keys.shape  # (P, heads, Lp-1, head_dim) before repetition
            self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True
            self._k = layer.keys.new_empty((B * k, H, L + room, D))
            self._v = layer.values.new_empty((B * k, H, L + room, D))
            self._k.view(B, k, H, L + room, D)[:, :, :, :L] = layer.keys[:, None]
            self._v.view(B, k, H, L + room, D)[:, :, :, :L] = layer.values[:, None]
            self._fill(L)

        def _fill(self, n: int) -> None:
            self.length, self.keys, self.values = n, self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            n = self.length + key_states.shape[-2]
            if n > self._k.shape[2]:  # out of room (not with the room sample() asks for)
                self._k, self._v = _grown(self._k, n), _grown(self._v, n)
            self._k[:, :, self.length:n] = key_states
            self._v[:, :, self.length:n] = value_states
            self._fill(n)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)  # checks the argument, crops keys and values
            self._fill(self.keys.shape[2])

        def reset(self) -> None:
            self._fill(0)

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("a reserved cache layer is already repeated")

        def batch_select_indices(self, indices: Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._fill(self.length)

    return _ReservedLayer


def _grown(buffer: Tensor, n: int) -> Tensor:  # (B, H, L, D) -> (B, H, max(n, 2L), D)
    B, H, L, D = buffer.shape
    return torch.cat([buffer, buffer.new_empty((B, H, max(n, 2 * L) - L, D))], 2)


def reserved_layer(layer, k: int, room: int):
    """`layer` (a filled DynamicLayer of P rows) repeated k times per row into buffers with `room`
    free positions (`_reserved_layer_class`)."""
    return _reserved_layer_class()(layer, k, room)


def generation_model(model: nn.Module) -> nn.Module:
    """The object to call generate() on: the PEFT model (adapter active) or the HF model."""
    model = getattr(model, "module", model)
    return model if hasattr(model, "generate") else hf_model(model)


def to_rows(sequences: Tensor, prompt_mask: Tensor, eos_ids: list[int], pad_id: int, num_prompts: int,
            k: int) -> SampleBatch:
    """Left-padded generate() output -> right-padded rows with a response mask."""
    lp = prompt_mask.shape[1]
    response = sequences[:, lp:]  # (S, new)
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    keep = ~after_eos  # (S, new) sampled tokens up to and including EOS
    prompt_lens = prompt_mask.sum(1)  # (S,)
    lengths = keep.sum(1)  # (S,)
    width = int((prompt_lens + lengths).max())
    ids = torch.full((sequences.shape[0], width), pad_id, dtype=sequences.dtype, device=sequences.device)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i in range(sequences.shape[0]):
        p, n = int(prompt_lens[i]), int(lengths[i])
        ids[i, :p] = sequences[i, :lp][prompt_mask[i].bool()]
        ids[i, p:p + n] = response[i, :n]
        resp_mask[i, p:p + n] = True
    attn = (torch.arange(width, device=ids.device)[None] < (prompt_lens + lengths)[:, None]).long()
    finished = (is_eos & keep).any(1)
    return SampleBatch(Rows(ids, attn, resp_mask), num_prompts, k, lengths, finished)


def sample_prompts(model: nn.Module, tokenizer, prompts: list, data_cfg: DataConfig, k: int,
                   max_new_tokens: int, seed: int, device: torch.device | None = None,
                   temperature: float = 1.0) -> SampleBatch:
    """k responses for each prompt (a string or a conversation), encoded as training encodes
    prompts (`softpo.collate.prompt_batch`), on `device` (default: the model's)."""
    ids, mask = prompt_batch(prompts, tokenizer, data_cfg)  # (P, Lp)
    device = device if device is not None else next(model.parameters()).device
    return sample(model, tokenizer, ids.to(device), mask.to(device), k, max_new_tokens, seed,
                  temperature)
