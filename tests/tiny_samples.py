"""A tiny reference model, a perturbed copy of it as the policy, and the policy's samples: the set-up
of the tests that score sampled responses (test_logprobs, test_packing)."""

import copy

import torch

from softpo.config import TinyModelConfig
from softpo.models import build_tiny_model, byte_tokenizer
from softpo.sampling import SampleBatch, sample


def perturbed_samples(arch: str, attn: str, prompts: list[str], k: int, max_new_tokens: int,
                      seed: int) -> tuple[torch.nn.Module, torch.nn.Module, object, SampleBatch]:
    """(policy, reference, tokenizer, batch): a 2-layer `arch` model is the reference, the policy
    is a copy with every weight moved by 0.05 N(0, 1), and `batch` holds k samples of at most
    `max_new_tokens` tokens per prompt from the policy (prompts left-padded)."""
    tok = byte_tokenizer()
    ref = build_tiny_model(TinyModelConfig(architecture=arch, n_layer=2, n_embd=32, n_head=2), tok,
                           seed=0, attn_implementation=attn).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch = sample(policy, tok, enc["input_ids"], enc["attention_mask"], k, max_new_tokens,
                   seed=seed)
    return policy, ref, tok, batch
