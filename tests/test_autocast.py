"""`model.autocast_bf16` really runs the policy's matrix multiplies in bf16 on the CPU (weights stay
float32), the output layer's log-softmax in float32, and the log-probs stay close to float32 ones."""

import torch
from torch import nn

from softpo.config import TinyModelConfig
from softpo.logprobs import PolicyScorer
from softpo.packing import Rows
from softpo.models import build_tiny_model, byte_tokenizer


def test_bf16_autocast_on_cpu():
    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, seed=0)
    ids = torch.tensor([tok("How was it? It was fine.")["input_ids"]])  # (1, T)
    rows = Rows(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None] >= 12)
    seen = {}

    def record(module, args, out):
        seen[type(module).__name__] = out.dtype

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    bf16 = PolicyScorer(model, autocast=True)(rows).token_logps.detach()
    assert seen and set(seen.values()) == {torch.bfloat16}  # every linear layer ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights float32
    seen.clear()
    fp32 = PolicyScorer(model, autocast=False)(rows).token_logps.detach()
    assert set(seen.values()) == {torch.float32}
    for h in hooks:
        h.remove()
    assert bf16.dtype == torch.float32  # log-softmax and sums in float32
    # bf16 keeps 8 bits of mantissa: per-token log-probs agree to about 1e-2 here, not exactly
    assert 0 < float((bf16 - fp32).abs().max()) < 0.05
